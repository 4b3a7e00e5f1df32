/* Traffic generators for the picosnitch benchmark: one mode per scenario.
 *
 * usage: gen MODE HOST PORT BYTES
 * Every mode counts the application bytes it moved (return values of its
 * send and receive calls) and prints {"sent": N, "received": M}. Exit code 3
 * means the kernel does not support what the mode needs.
 *
 * The peer (bench/peer.py) speaks a line protocol on TCP PORT ("up N",
 * "down N", "echo N"), echoes UDP on PORT and 443, sinks UDP on 53, and
 * answers "N SIZE" on UDP PORT+1 with N datagrams of SIZE bytes.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip_icmp.h>
#include <netinet/udp.h>
#include <linux/if_packet.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long sent, received;
static const char *host;
static int port;
static long long nbytes;
static char buf[1 << 16];

static void die(const char *what) { perror(what); exit(1); }

static int family(void) { return strchr(host, ':') ? AF_INET6 : AF_INET; }

static socklen_t peer_addr(struct sockaddr_storage *ss, int p) {
    memset(ss, 0, sizeof(*ss));
    if (family() == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(p);
        inet_pton(AF_INET6, host, &a->sin6_addr);
        return sizeof(*a);
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_port = htons(p);
    inet_pton(AF_INET, host, &a->sin_addr);
    return sizeof(*a);
}

static int tcp_connect(int proto) {
    struct sockaddr_storage ss;
    socklen_t len = peer_addr(&ss, port);
    int s = socket(family(), SOCK_STREAM, proto);
    if (s < 0) {
        if (errno == EPROTONOSUPPORT || errno == ESOCKTNOSUPPORT) exit(3);
        die("socket");
    }
    if (connect(s, (struct sockaddr *)&ss, len)) die("connect");
    return s;
}

static void send_all(int s, const char *data, long long n) {
    while (n > 0) {
        ssize_t r = send(s, data, n > (long long)sizeof(buf) ? (long long)sizeof(buf) : n, 0);
        if (r <= 0) die("send");
        sent += r;
        n -= r;
    }
}

static int request(const char *verb, long long n, int proto) {
    int s = tcp_connect(proto);
    char line[64];
    int len = snprintf(line, sizeof(line), "%s %lld\n", verb, n);
    send_all(s, line, len);
    return s;
}

static void recv_until_eof(int s) {
    ssize_t r;
    while ((r = recv(s, buf, sizeof(buf), 0)) > 0) received += r;
}

static void tcp_up(int proto) {
    int s = request("up", nbytes, proto);
    for (long long left = nbytes; left > 0; left -= sizeof(buf))
        send_all(s, buf, left > (long long)sizeof(buf) ? (long long)sizeof(buf) : left);
    shutdown(s, SHUT_WR);
    recv_until_eof(s);
    close(s);
}

static void mode_tcp_down(void) { int s = request("down", nbytes, 0); recv_until_eof(s); close(s); }
static void mode_tcp_up(void) { tcp_up(0); }
static void mode_sctp(void) { tcp_up(132); }

static void mode_tcp_duplex(void) {
    int s = request("echo", nbytes, 0);
    long long to_send = nbytes;
    fcntl(s, F_SETFL, O_NONBLOCK);
    while (received < nbytes) {
        struct pollfd p = {s, POLLIN | (to_send ? POLLOUT : 0), 0};
        poll(&p, 1, 5000);
        if (p.revents & POLLOUT && to_send) {
            ssize_t r = send(s, buf, to_send > (long long)sizeof(buf) ? (long long)sizeof(buf) : to_send, 0);
            if (r > 0) { sent += r; to_send -= r; }
        }
        if (p.revents & POLLIN) {
            ssize_t r = recv(s, buf, sizeof(buf), 0);
            if (r <= 0) break;
            received += r;
        }
    }
    close(s);
}

static int udp_socket(void) {
    int s = socket(family(), SOCK_DGRAM, 0), size = 8 << 20;
    struct timeval tv = {2, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size));
    return s;
}

/* unconnected UDP: datagrams of `size` with sendto, each echo read with recvfrom */
static void udp_echo(int p, int size) {
    struct sockaddr_storage ss, from;
    socklen_t len = peer_addr(&ss, p), flen;
    int s = udp_socket();
    for (long long left = nbytes; left > 0; left -= size) {
        int n = left < size ? left : size;
        ssize_t r = sendto(s, buf, n, 0, (struct sockaddr *)&ss, len);
        if (r > 0) sent += r;
        flen = sizeof(from);
        r = recvfrom(s, buf, sizeof(buf), 0, (struct sockaddr *)&from, &flen);
        if (r > 0) received += r;
    }
    close(s);
}

static void mode_udp(void) { udp_echo(port, 1200); }
static void mode_udp443(void) { udp_echo(443, 1200); }

static void mode_udp53(void) {
    struct sockaddr_storage ss;
    socklen_t len = peer_addr(&ss, 53);
    int s = udp_socket();
    for (long long left = nbytes; left > 0; left -= 40) {
        ssize_t r = sendto(s, buf, 40, 0, (struct sockaddr *)&ss, len);
        if (r > 0) sent += r;
    }
    close(s);
}

/* ask the peer for a burst of datagrams and receive them, with recvfrom or recvmmsg */
static void udp_burst(int use_mmsg) {
    struct sockaddr_storage ss, from[32];
    socklen_t len = peer_addr(&ss, port + 1);
    int s = udp_socket(), size = 1000, count = nbytes / size;
    char line[64];
    int n = snprintf(line, sizeof(line), "%d %d", count, size);
    ssize_t r = sendto(s, line, n, 0, (struct sockaddr *)&ss, len);
    if (r > 0) sent += r;
    static char bufs[32][2048];
    while (received < (long long)count * size) {
        if (!use_mmsg) {
            r = recvfrom(s, buf, sizeof(buf), 0, NULL, NULL);
            if (r <= 0) break;
            received += r;
            continue;
        }
        struct mmsghdr msgs[32];
        struct iovec iov[32];
        memset(msgs, 0, sizeof(msgs));
        for (int i = 0; i < 32; i++) {
            iov[i] = (struct iovec){bufs[i], sizeof(bufs[i])};
            msgs[i].msg_hdr = (struct msghdr){.msg_name = &from[i], .msg_namelen = sizeof(from[i]),
                                              .msg_iov = &iov[i], .msg_iovlen = 1};
        }
        int got = recvmmsg(s, msgs, 32, MSG_WAITFORONE, NULL);
        if (got <= 0) break;
        for (int i = 0; i < got; i++) received += msgs[i].msg_len;
    }
    close(s);
}

static void mode_udp_down(void) { udp_burst(0); }
static void mode_recvmmsg(void) { udp_burst(1); }

static void mode_sendmmsg(void) {
    struct sockaddr_storage ss;
    socklen_t len = peer_addr(&ss, 53);
    int s = udp_socket();
    struct mmsghdr msgs[32];
    struct iovec iov = {buf, 1000};
    for (int i = 0; i < 32; i++)
        msgs[i].msg_hdr = (struct msghdr){.msg_name = &ss, .msg_namelen = len, .msg_iov = &iov, .msg_iovlen = 1};
    for (long long left = nbytes; left > 0; left -= 32 * 1000) {
        int got = sendmmsg(s, msgs, 32, 0);
        for (int i = 0; i < got; i++) sent += msgs[i].msg_len;
    }
    close(s);
}

static unsigned short checksum(void *data, int len) {
    unsigned long sum = 0;
    unsigned short *p = data;
    for (; len > 1; len -= 2) sum += *p++;
    if (len) sum += *(unsigned char *)p;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

static void mode_icmp(void) {
    struct sockaddr_storage ss;
    socklen_t len = peer_addr(&ss, 0);
    int s = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP), count = nbytes / 1000;
    struct timeval tv = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    for (int i = 0; i < count; i++) {
        struct icmphdr *h = (struct icmphdr *)buf;
        memset(buf, 'p', 1008);
        *h = (struct icmphdr){.type = ICMP_ECHO, .un.echo.id = htons(getpid()), .un.echo.sequence = htons(i)};
        h->checksum = checksum(buf, 1008);
        ssize_t r = sendto(s, buf, 1008, 0, (struct sockaddr *)&ss, len);
        if (r > 0) sent += r;
        r = recv(s, buf, sizeof(buf), 0);       /* the reply, with its IP header */
        if (r > 0) received += r;
    }
    close(s);
}

static void mode_raw253(void) {
    struct sockaddr_storage ss;
    socklen_t len = peer_addr(&ss, 0);
    int s = socket(family(), SOCK_RAW, 253);
    for (long long left = nbytes; left > 0; left -= 500) {
        ssize_t r = sendto(s, buf, 500, 0, (struct sockaddr *)&ss, len);
        if (r > 0) sent += r;
    }
    close(s);
}

/* AF_PACKET: whole Ethernet frames carrying IPv4/UDP to the peer (port = ifindex source) */
static void mode_packet(void) {
    const char *ifname = getenv("BENCH_IFNAME");
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_IP)), ifindex = if_nametoindex(ifname);
    struct ifreq ifr = {0};
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    ioctl(s, SIOCGIFHWADDR, &ifr);
    unsigned char frame[542];
    struct ether_header *eth = (struct ether_header *)frame;
    struct iphdr *ip = (struct iphdr *)(frame + 14);
    struct udphdr *udp = (struct udphdr *)(frame + 34);
    memset(frame, 'f', sizeof(frame));
    memset(eth->ether_dhost, 0xff, 6);
    memcpy(eth->ether_shost, ifr.ifr_hwaddr.sa_data, 6);
    eth->ether_type = htons(ETH_P_IP);
    *ip = (struct iphdr){.ihl = 5, .version = 4, .tot_len = htons(sizeof(frame) - 14), .ttl = 64,
                         .protocol = IPPROTO_UDP, .saddr = inet_addr(getenv("BENCH_SRC")), .daddr = inet_addr(host)};
    ip->check = checksum(ip, 20);
    *udp = (struct udphdr){.source = htons(40000), .dest = htons(53), .len = htons(sizeof(frame) - 34)};
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = ifindex, .sll_halen = 6};
    memset(to.sll_addr, 0xff, 6);
    for (long long left = nbytes; left > 0; left -= sizeof(frame)) {
        ssize_t r = sendto(s, frame, sizeof(frame), 0, (struct sockaddr *)&to, sizeof(to));
        if (r > 0) sent += r;
    }
    close(s);
}

static int uring_op(struct io_uring *ring, int s, int send_op, size_t n) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (send_op) io_uring_prep_send(sqe, s, buf, n, 0);
    else io_uring_prep_recv(sqe, s, buf, n, 0);
    io_uring_submit(ring);
    struct io_uring_cqe *cqe;
    if (io_uring_wait_cqe(ring, &cqe)) die("io_uring_wait_cqe");
    int r = cqe->res;
    io_uring_cqe_seen(ring, cqe);
    if (r < 0) { errno = -r; die("io_uring"); }
    return r;
}

static void mode_uring_send(void) {
    struct io_uring ring;
    if (io_uring_queue_init(8, &ring, 0)) exit(3);
    int s = request("up", nbytes, 0);
    for (long long left = nbytes; left > 0;) {
        int r = uring_op(&ring, s, 1, left > (long long)sizeof(buf) ? sizeof(buf) : left);
        sent += r;
        left -= r;
    }
    shutdown(s, SHUT_WR);
    recv_until_eof(s);
    io_uring_queue_exit(&ring);
}

static void mode_uring_recv(void) {
    struct io_uring ring;
    if (io_uring_queue_init(8, &ring, 0)) exit(3);
    int s = request("down", nbytes, 0), r;
    while ((r = uring_op(&ring, s, 0, sizeof(buf))) > 0) received += r;
    io_uring_queue_exit(&ring);
}

static void mode_sendfile(void) {
    char path[] = "/tmp/bench-sendfile-XXXXXX";
    int f = mkstemp(path);
    unlink(path);
    for (long long left = nbytes; left > 0; left -= sizeof(buf))
        if (write(f, buf, left > (long long)sizeof(buf) ? (long long)sizeof(buf) : left) < 0) die("write");
    int s = request("up", nbytes, 0);
    off_t off = 0;
    while (off < nbytes) {
        ssize_t r = sendfile(s, f, &off, nbytes - off);
        if (r <= 0) die("sendfile");
        sent += r;
    }
    shutdown(s, SHUT_WR);
    recv_until_eof(s);
}

static void mode_splice(void) {
    int s = request("down", nbytes, 0), p[2], null = open("/dev/null", O_WRONLY);
    if (pipe(p)) die("pipe");
    ssize_t r;
    while ((r = splice(s, NULL, p[1], NULL, 1 << 16, SPLICE_F_MOVE)) > 0) {
        received += r;
        if (splice(p[0], NULL, null, NULL, r, SPLICE_F_MOVE) < 0) die("splice");
    }
}

static void mode_drip(void) {
    int s = request("up", nbytes, 0);
    for (long long i = 0; i < nbytes; i++) {
        send_all(s, "d", 1);
        usleep(50000);
    }
    shutdown(s, SHUT_WR);
    recv_until_eof(s);
}

static void mode_many_tcp(void) {
    long long each = 100, count = nbytes / each, total = nbytes;
    nbytes = each;
    for (long long i = 0; i < count; i++) tcp_up(0);
    nbytes = total;
}

static void *burst_thread(void *arg) {
    (void)arg;
    int s = request("up", nbytes, 0);
    char *block = calloc(1, 1 << 16);
    long long mine = 0;
    for (long long left = nbytes; left > 0;) {
        ssize_t r = send(s, block, left > (1 << 16) ? (1 << 16) : left, 0);
        if (r <= 0) die("send");
        left -= r;
        mine += r;
    }
    shutdown(s, SHUT_WR);
    while (recv(s, block, 1 << 16, 0) > 0) {}
    __sync_fetch_and_add(&sent, mine);
    return NULL;
}

static void mode_burst(void) {
    pthread_t t[8];
    long long total = nbytes;
    nbytes /= 8;
    for (int i = 0; i < 8; i++) pthread_create(&t[i], NULL, burst_thread, NULL);
    for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
    nbytes = total;
}

/* short-lived processes: each child sends one datagram of BYTES/50 and exits at once */
static void mode_short(void) {
    struct sockaddr_storage ss;
    socklen_t len = peer_addr(&ss, 53);
    int each = nbytes / 50;
    for (int i = 0; i < 50; i++) {
        if (fork() == 0) {
            int s = socket(family(), SOCK_DGRAM, 0);
            _exit(sendto(s, buf, each, 0, (struct sockaddr *)&ss, len) == each ? 0 : 1);
        }
    }
    int status, ok = 0;
    while (wait(&status) > 0) ok += WIFEXITED(status) && WEXITSTATUS(status) == 0;
    sent = (long long)ok * each;
}

/* overhead loops: as many calls as possible for BYTES milliseconds */
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

/* 1-byte datagrams to the discard port (dropped by the peer's nftables),
   for BYTES milliseconds: on a connected socket with send(), or unconnected
   with sendto() */
static void udp_loop(int connected) {
    struct sockaddr_storage ss;
    socklen_t len = peer_addr(&ss, 9);
    int s = udp_socket();
    if (connected && connect(s, (struct sockaddr *)&ss, len)) die("connect");
    double end = now() + nbytes / 1000.0;
    long long calls = 0;
    while (1) {
        for (int i = 0; i < 1000; i++)
            if ((connected ? send(s, buf, 1, 0) : sendto(s, buf, 1, 0, (struct sockaddr *)&ss, len)) == 1) sent++;
        calls += 1000;
        if (now() >= end) break;
    }
    printf("{\"calls\": %lld, \"seconds\": %.3f, ", calls, nbytes / 1000.0);
}

static void mode_udp_loop(void) { udp_loop(1); }
static void mode_udp_sendto_loop(void) { udp_loop(0); }

static void mode_tcp_loop(void) {
    int s = request("up", 1LL << 50, 0);
    double start = now(), end = start + nbytes / 1000.0;
    while (now() < end) send_all(s, buf, sizeof(buf));
    printf("{\"calls\": 0, \"seconds\": %.3f, ", now() - start);
    close(s);
}

static const struct { const char *name; void (*run)(void); } MODES[] = {
    {"tcp-down", mode_tcp_down}, {"tcp-up", mode_tcp_up}, {"tcp-duplex", mode_tcp_duplex},
    {"udp", mode_udp}, {"icmp", mode_icmp}, {"udp443", mode_udp443}, {"sctp", mode_sctp},
    {"udp53", mode_udp53}, {"raw253", mode_raw253}, {"short", mode_short}, {"packet", mode_packet},
    {"uring-send", mode_uring_send}, {"sendfile", mode_sendfile}, {"sendmmsg", mode_sendmmsg},
    {"drip", mode_drip}, {"many-tcp", mode_many_tcp}, {"burst", mode_burst}, {"uring-recv", mode_uring_recv},
    {"splice", mode_splice}, {"recvmmsg", mode_recvmmsg}, {"udp-down", mode_udp_down},
    {"udp-loop", mode_udp_loop}, {"udp-sendto-loop", mode_udp_sendto_loop}, {"tcp-loop", mode_tcp_loop},
};

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: gen MODE HOST PORT BYTES\n"); return 2; }
    host = argv[2];
    port = atoi(argv[3]);
    nbytes = atoll(argv[4]);
    memset(buf, 'b', sizeof(buf));
    for (size_t i = 0; i < sizeof(MODES) / sizeof(MODES[0]); i++) {
        if (strcmp(MODES[i].name, argv[1])) continue;
        int loop = strstr(argv[1], "-loop") != NULL;
        MODES[i].run();
        printf("%s\"sent\": %lld, \"received\": %lld}\n", loop ? "" : "{", sent, received);
        return 0;
    }
    fprintf(stderr, "gen: unknown mode %s\n", argv[1]);
    return 2;
}
