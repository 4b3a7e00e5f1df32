"""The BTF reader: offsets it reads are checked against what this process knows of itself."""
import os
import threading

import picosnitch
from conftest import need_root

PROBE = r"""
BPF_ARRAY(out, u64, 6);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    void *task = (void *)bpf_get_current_task();
    if (F_TASK_TGID(task) != WANT_TGID) return 0;
    void *inode = read_ptr(read_ptr(read_ptr(task, TASK_MM), MM_EXE_FILE), FILE_INODE);
    u64 values[6] = {F_TASK_TGID(task), F_TASK_PID(task), F_TASK_TGID(read_ptr(task, TASK_REAL_PARENT)),
                     F_INODE_INO(inode), F_SB_DEV(read_ptr(inode, INODE_SB)), 1};
    for (int i = 0; i < 6; i++) {
        int k = i;
        out.update(&k, &values[i]);
    }
    return 0;
}
"""


def test_struct_offsets_match_this_process():
    need_root()
    btf = picosnitch.BTF.from_file()
    picosnitch.ensure_tracefs(print)
    headers, _ = picosnitch.find_kernel_headers(os.uname().release)
    text = picosnitch.bpf_prelude(btf) + PROBE.replace("WANT_TGID", str(os.getpid()))
    bpf = picosnitch.compile_program(text, headers)
    try:
        os.getppid()
        values = [bpf["out"][i].value for i in range(6)]
    finally:
        bpf.cleanup()
    st = os.stat("/proc/self/exe")
    assert values[5] == 1, "the probe did not run"
    assert values[:3] == [os.getpid(), threading.get_native_id(), os.getppid()]
    assert values[3] == st.st_ino
    assert picosnitch.kernel_dev_to_user(values[4]) == st.st_dev


def test_nested_and_anonymous_members():
    btf = picosnitch.BTF.from_file()
    # sock_common keeps its addresses inside anonymous unions and structs
    daddr, saddr = btf.field("sock_common.skc_daddr"), btf.field("sock_common.skc_rcv_saddr")
    assert (daddr.size, saddr.size, saddr.offset - daddr.offset) == (4, 4, 4)
    path, dentry = btf.field("file.f_path"), btf.field("file.f_path.dentry")
    assert dentry.offset == path.offset + btf.field("path.dentry").offset
    assert btf.field("task_struct.comm").size == 16


def test_missing_struct_or_member_is_named():
    btf = picosnitch.BTF.from_file()
    for path, message in [("no_such_struct.x", "no struct no_such_struct"),
                          ("task_struct.no_such_member", "struct task_struct has no member no_such_member")]:
        try:
            btf.field(path)
        except picosnitch.PicosnitchError as e:
            assert message in str(e)
        else:
            raise AssertionError(f"{path} was found")


def test_capture_mode_is_chosen_from_btf():
    need_root()
    picosnitch.ensure_tracefs(print)
    btf = picosnitch.BTF.from_file()
    has_sock_tracepoints = os.path.isdir("/sys/kernel/tracing/events/sock/sock_send_length")
    assert picosnitch.capture_mode(btf) == ("tracepoint" if has_sock_tracepoints else "kprobe")
    assert btf.has_raw_tracepoint("sched_process_exec")
    assert not btf.has_raw_tracepoint("no_such_tracepoint")
