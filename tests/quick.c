/* Sends one UDP datagram of argv[3] bytes to argv[1]:argv[2] and exits at once.
   TAG (set at compile time) makes every build's sha256 unique. */
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static const char tag[] = TAG;

int main(int argc, char **argv) {
    static char buf[65536];
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    size_t n = (size_t)atoi(argv[3]);
    if (argc != 4 || inet_pton(AF_INET, argv[1], &to.sin_addr) != 1 || n > sizeof(buf)) return 2;
    memset(buf, tag[0], n);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    return sendto(s, buf, n, 0, (struct sockaddr *)&to, sizeof(to)) == (ssize_t)n ? 0 : 1;
}
