"""Private PostgreSQL and MariaDB servers from Debian's packages, each in a
temporary directory on its own loopback port, with a password-protected user.
They can be stopped, paused and started again to play a failing server."""
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time

PASSWORD = "s3cret-picosnitch-pw"
USER, DATABASE = "snitch", "snitchdb"


def _as(user, *cmd, **kw):
    return subprocess.run(["runuser", "-u", user, "--", *cmd], check=True, capture_output=True, text=True, **kw)


def _wait_port(port, timeout=60):
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"no server came up on port {port}")


class Server:
    """Common handling: a data directory, a process, stop/pause/resume."""
    port = 0
    proc = None

    def __init__(self, owner):
        self.dir = tempfile.mkdtemp(prefix=f"ps-{self.name}-")
        shutil.chown(self.dir, owner, owner)
        os.chmod(self.dir, 0o700)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(60)

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def remove(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Postgres(Server):
    name, port, clients = "postgres", 55432, ("psycopg", "psycopg2")

    def __init__(self):
        super().__init__("postgres")
        self.bin = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        pwfile = os.path.join(self.dir, "pw")
        with open(pwfile, "w") as f:
            f.write(PASSWORD)
        shutil.chown(pwfile, "postgres", "postgres")
        _as("postgres", f"{self.bin}/initdb", "-D", f"{self.dir}/data", "-U", USER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256")
        os.unlink(pwfile)

    def start(self):
        self.proc = subprocess.Popen(["runuser", "-u", "postgres", "--", f"{self.bin}/postgres", "-D", f"{self.dir}/data",
                                      "-p", str(self.port), "-k", self.dir, "-c", "listen_addresses=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_port(self.port)
        for _ in range(50):
            done = subprocess.run(["runuser", "-u", "postgres", "--", f"{self.bin}/psql", "-h", self.dir, "-p",
                                   str(self.port), "-U", USER, "-d", "postgres", "-c", f"CREATE DATABASE {DATABASE}"],
                                  capture_output=True, text=True)
            if done.returncode == 0 or "already exists" in done.stderr:
                return self
            time.sleep(0.2)
        raise RuntimeError(done.stderr)

    def settings(self, client, **extra):
        names = {"psycopg": ("dbname", "password"), "psycopg2": ("dbname", "password")}[client]
        return dict({"client": client, "host": "127.0.0.1", "port": self.port, "user": USER,
                     names[0]: DATABASE, names[1]: PASSWORD}, **extra)

    def query(self, sql):
        out = subprocess.run(["runuser", "-u", "postgres", "--", f"{self.bin}/psql", "-h", self.dir, "-p", str(self.port),
                              "-U", USER, "-d", DATABASE, "-At", "-F", "\t", "-c", sql],
                             check=True, capture_output=True, text=True).stdout
        return [line.split("\t") for line in out.splitlines()]


class MariaDB(Server):
    name, port, clients = "mariadb", 33306, ("mariadb", "pymysql")

    def __init__(self):
        super().__init__("mysql")
        subprocess.run(["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={self.dir}/data",
                        "--auth-root-authentication-method=socket"], check=True, capture_output=True, text=True)
        self.socket = os.path.join(self.dir, "sock")
        self.created = False

    def start(self):
        self.proc = subprocess.Popen(["/usr/sbin/mariadbd", "--no-defaults", "--user=mysql", f"--datadir={self.dir}/data",
                                      f"--socket={self.socket}", f"--port={self.port}", "--bind-address=127.0.0.1",
                                      f"--pid-file={self.dir}/pid", "--skip-log-bin"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_port(self.port)
        if not self.created:
            self.root_sql(f"CREATE DATABASE IF NOT EXISTS {DATABASE}; "
                          f"CREATE USER IF NOT EXISTS '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'; "
                          f"GRANT ALL ON {DATABASE}.* TO '{USER}'@'127.0.0.1'; FLUSH PRIVILEGES;")
            self.created = True
        return self

    def root_sql(self, sql):
        return subprocess.run(["mariadb", f"--socket={self.socket}", "-u", "root", "-N", "-B", "-e", sql],
                              check=True, capture_output=True, text=True).stdout

    def settings(self, client, **extra):
        key = {"mariadb": "password", "pymysql": "password"}[client]
        return dict({"client": client, "host": "127.0.0.1", "port": self.port, "user": USER,
                     "database": DATABASE, key: PASSWORD}, **extra)

    def query(self, sql):
        out = self.root_sql(f"USE {DATABASE}; {sql}")
        return [line.split("\t") for line in out.splitlines()]


class PasswordTrap:
    """A listener that speaks just enough of the PostgreSQL protocol to ask a
    client for its password in clear text, and records every startup (the
    user named) and every password it gets."""
    SSL_REQUEST, GSS_REQUEST = 80877103, 80877104

    def __init__(self):
        import socket
        import threading
        self.startups, self.passwords = [], []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        import threading
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.talk, args=(conn,), daemon=True).start()

    @staticmethod
    def read(conn, n):
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def talk(self, conn):
        import struct
        with conn:
            try:
                while True:
                    length, code = struct.unpack("!II", self.read(conn, 8))
                    body = self.read(conn, length - 8)
                    if code in (self.SSL_REQUEST, self.GSS_REQUEST):
                        conn.sendall(b"N")
                        continue
                    fields = body.split(b"\0")
                    self.startups.append(dict(zip(fields[0::2], fields[1::2])))
                    break
                conn.sendall(b"R" + struct.pack("!II", 8, 3))        # AuthenticationCleartextPassword
                kind, length = struct.unpack("!cI", self.read(conn, 5))
                if kind == b"p":
                    self.passwords.append(self.read(conn, length - 4).rstrip(b"\0").decode())
            except (EOFError, OSError, struct.error):
                pass

    def close(self):
        self.sock.close()
