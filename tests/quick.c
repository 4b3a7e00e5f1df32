/* Sends one UDP datagram of argv[3] bytes to argv[1]:argv[2] and exits at once,
   or after argv[4] milliseconds. TAG (set at compile time) makes every build's
   sha256 unique. */
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

/* kept whole in the binary (used), so that every build has its own sha256 */
__attribute__((used)) static const char tag[] = TAG;

int main(int argc, char **argv) {
    static char buf[65536];
    if (argc != 4 && argc != 5) return 2;
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    size_t n = (size_t)atoi(argv[3]);
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1 || n > sizeof(buf)) return 2;
    memset(buf, tag[0], n);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (sendto(s, buf, n, 0, (struct sockaddr *)&to, sizeof(to)) != (ssize_t)n) return 1;
    if (argc == 5) {
        long ms = atol(argv[4]);
        struct timespec linger = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&linger, NULL);
    }
    return 0;
}
