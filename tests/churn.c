/* Connection churn: opens short connections to 127.0.0.1:PORT as fast as it
   can, each moving BYTES bytes, until COUNT connections or SECONDS have
   passed, and prints what it did as JSON:
   {"connections": n, "sent": bytes, "received": bytes, "seconds": s}.
   tcp: each connection connects, writes BYTES and closes; a child of this
   program listens on the port and reads every connection to its end
   ("received"). udp: each socket sends one datagram of BYTES and is closed
   (no one listens).
   usage: churn tcp|udp PORT COUNT BYTES [SECONDS [RATE]]
   (SECONDS 0: no limit; RATE: at most that many connections a second)
   TAG (optional, at compile time) makes every build's sha256 unique. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef TAG
#define TAG "churn"
#endif
__attribute__((used)) static const char tag[] = TAG;

static volatile sig_atomic_t stopping;
static void on_stop(int sig) { (void)sig; stopping = 1; }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static struct sockaddr_in address(int port) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    return to;
}

/* read one accepted connection to its end */
static long long drain(int fd) {
    char buf[4096];
    long long total = 0;
    ssize_t n;
    while ((n = read(fd, buf, sizeof(buf))) > 0) total += n;
    close(fd);
    return total;
}

/* the listening child: accepts and reads until told to stop and nothing is
   left to accept, then writes what it read to out */
static void serve(int listener, int out) {
    long long total = 0;
    signal(SIGUSR1, on_stop);
    fcntl(listener, F_SETFL, O_NONBLOCK);
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd >= 0) {
            fcntl(fd, F_SETFL, 0);
            total += drain(fd);
            continue;
        }
        if (stopping) break;
        struct pollfd p = {.fd = listener, .events = POLLIN};
        poll(&p, 1, 50);
    }
    if (write(out, &total, sizeof(total)) != sizeof(total)) _exit(1);
    _exit(0);
}

int main(int argc, char **argv) {
    static char buf[65536];
    if (argc < 5 || argc > 7) {
        fprintf(stderr, "usage: churn tcp|udp PORT COUNT BYTES [SECONDS [RATE]]\n");
        return 2;
    }
    int tcp = !strcmp(argv[1], "tcp"), port = atoi(argv[2]);
    long long count = atoll(argv[3]), n = 0, sent = 0, received = 0;
    size_t bytes = (size_t)atol(argv[4]);
    double seconds = argc >= 6 ? atof(argv[5]) : 0, rate = argc == 7 ? atof(argv[6]) : 0, start = now();
    if ((!tcp && strcmp(argv[1], "udp")) || bytes > sizeof(buf)) return 2;
    memset(buf, tag[0], bytes);
    struct sockaddr_in to = address(port);
    int pipefd[2] = {-1, -1};
    pid_t server = -1;
    if (tcp) {
        int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(listener, (struct sockaddr *)&to, sizeof(to)) || listen(listener, 4096) || pipe(pipefd)) {
            perror("churn: listen");
            return 1;
        }
        server = fork();
        if (server == 0) serve(listener, pipefd[1]);
        close(listener);
    }
    while (n < count && !(seconds > 0 && now() - start >= seconds)) {
        if (rate > 0 && n >= rate * (now() - start)) {
            usleep(200);
            continue;
        }
        int s = socket(AF_INET, tcp ? SOCK_STREAM : SOCK_DGRAM, 0);
        if (s < 0) {
            perror("churn: socket");
            return 1;
        }
        if (tcp) {
            if (connect(s, (struct sockaddr *)&to, sizeof(to))) {
                close(s);
                if (errno == EADDRNOTAVAIL || errno == EAGAIN) {     /* (local ports in TIME_WAIT) */
                    usleep(1000);
                    continue;
                }
                perror("churn: connect");
                return 1;
            }
            ssize_t w = write(s, buf, bytes);
            if (w > 0) sent += w;
        } else {
            ssize_t w = sendto(s, buf, bytes, 0, (struct sockaddr *)&to, sizeof(to));
            if (w > 0) sent += w;
        }
        close(s);
        n++;
    }
    double took = now() - start;
    if (tcp) {
        kill(server, SIGUSR1);
        if (read(pipefd[0], &received, sizeof(received)) != sizeof(received)) received = -1;
        waitpid(server, NULL, 0);
    }
    printf("{\"connections\": %lld, \"sent\": %lld, \"received\": %lld, \"seconds\": %.3f}\n", n, sent, received,
           took);
    return 0;
}
