/*
 * RTP load generator and receiver for the pyrtpproxy benchmark harness.
 *
 * Compiled at run time by bench/generator.py (gcc -O2).  One process, one
 * thread: a 1 ms timerfd paces the sends, epoll wakes it for received
 * packets.  It plays both ends (A and B) of every session it is given.
 *
 *   loadgen NSOCK RCVBUF PPS SIZE WARMUP_MS DURATION_MS TAIL_MS DRAIN_MS BIND_IP RELAY_IP
 *
 * Protocol on stdin/stdout (one line each):
 *   -> "PORTS a1,a2,...;b1,b2,..."      the A-side and B-side endpoint ports
 *   <- "N"                              then N lines "SID IA IB PORT_A PORT_B":
 *                                       A (socket IA) sends to RELAY_IP:PORT_A and
 *                                       B (socket IB) sends to RELAY_IP:PORT_B
 *   -> "START <realtime_ns>"            the measurement window begins
 *   -> "END <realtime_ns>"              it ends
 *   -> "RESULT {json}"                  after the drain period
 *
 * Every packet is SIZE bytes: a 12-byte RTP header (PT 0, seq, timestamp
 * +160, one SSRC per stream) and a payload that starts with a magic word,
 * the session id, the direction, a "measured" flag and the CLOCK_REALTIME
 * send time.  Arrival time is the kernel's receive timestamp
 * (SO_TIMESTAMPNS), so the receiver's own scheduling does not count.
 * Sessions are spread evenly over the packet interval (no bursts).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x42505452u /* "RTPB" */
#define BATCH 64
#define TICK_NS 1000000LL
#define HIST_BIN_NS 10000LL /* 10 us */
#define HIST_BINS 20000     /* up to 200 ms */
#define PKT_MAX 1500

#ifndef SO_RXQ_OVFL
#define SO_RXQ_OVFL 40
#endif

struct payload {
    uint32_t magic;
    uint32_t sid;
    uint8_t dir;
    uint8_t measured;
    uint16_t pad;
    int64_t ts_ns;
} __attribute__((packed));

static int nsock;
static int *sock_a, *sock_b;
static int nsess, nstreams;
static uint32_t *sess_id;          /* per session */
static int *st_sock;               /* per stream: fd it is sent from */
static struct sockaddr_in *st_dst; /* per stream: relay address */
static uint16_t *st_seq;
static uint32_t *st_ts;
static uint64_t *st_sent, *st_recv;
static int **slot_list; /* per slot: stream indices, sorted by socket */
static int *slot_len;
static int nslots;
static uint64_t hist[HIST_BINS];
static uint64_t hist_over, hist_neg;
static uint64_t recv_unmeasured, recv_bad, send_err, send_partial;
static uint64_t late_ticks;
static int64_t max_late_ns;
static uint32_t *rxq_ovfl; /* per socket (A then B) */
static int pkt_size;

static int64_t now_ns(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static int open_sock(const char *ip, int rcvbuf)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0)
        die("socket");
    int one = 1;
    if (setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)) < 0)
        setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    int sndbuf = 4 << 20;
    if (setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)) < 0)
        setsockopt(s, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    setsockopt(s, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof(one));
    setsockopt(s, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof(one));
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = 0;
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1)
        die("inet_pton");
    if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0)
        die("bind");
    return s;
}

static int port_of(int s)
{
    struct sockaddr_in a;
    socklen_t l = sizeof(a);
    getsockname(s, (struct sockaddr *)&a, &l);
    return ntohs(a.sin_port);
}

static int cmp_by_sock(const void *x, const void *y)
{
    int a = *(const int *)x, b = *(const int *)y;
    if (st_sock[a] != st_sock[b])
        return st_sock[a] - st_sock[b];
    return a - b;
}

/* Send every stream of one slot, one sendmmsg per run of the same socket. */
static void send_slot(int slot, int measured)
{
    static unsigned char bufs[BATCH][PKT_MAX];
    static struct mmsghdr msgs[BATCH];
    static struct iovec iovs[BATCH];
    static int which[BATCH];
    int *list = slot_list[slot];
    int len = slot_len[slot];
    int i = 0;
    while (i < len) {
        int fd = st_sock[list[i]];
        int n = 0;
        int64_t ts = now_ns(CLOCK_REALTIME);
        while (i < len && n < BATCH && st_sock[list[i]] == fd) {
            int j = list[i++];
            unsigned char *p = bufs[n];
            uint16_t seq = st_seq[j]++;
            uint32_t rts = st_ts[j];
            st_ts[j] += 160;
            uint32_t ssrc = 0x10000000u + (uint32_t)j;
            p[0] = 0x80;
            p[1] = 0; /* PCMU */
            p[2] = seq >> 8;
            p[3] = seq & 0xff;
            p[4] = rts >> 24;
            p[5] = rts >> 16;
            p[6] = rts >> 8;
            p[7] = rts;
            p[8] = ssrc >> 24;
            p[9] = ssrc >> 16;
            p[10] = ssrc >> 8;
            p[11] = ssrc;
            struct payload pl;
            pl.magic = MAGIC;
            pl.sid = sess_id[j / 2];
            pl.dir = j & 1;
            pl.measured = measured;
            pl.pad = 0;
            pl.ts_ns = ts;
            memcpy(p + 12, &pl, sizeof(pl));
            iovs[n].iov_base = p;
            iovs[n].iov_len = pkt_size;
            memset(&msgs[n], 0, sizeof(msgs[n]));
            msgs[n].msg_hdr.msg_iov = &iovs[n];
            msgs[n].msg_hdr.msg_iovlen = 1;
            msgs[n].msg_hdr.msg_name = &st_dst[j];
            msgs[n].msg_hdr.msg_namelen = sizeof(st_dst[j]);
            which[n] = j;
            n++;
        }
        int off = 0;
        while (off < n) {
            int r = sendmmsg(fd, msgs + off, n - off, 0);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                /* EAGAIN/ENOBUFS/ECONNREFUSED: this packet is lost at the
                 * sender; skip it and count. */
                send_err++;
                off++;
                continue;
            }
            if (r < n - off)
                send_partial++;
            if (measured)
                for (int k = off; k < off + r; k++)
                    st_sent[which[k]]++;
            off += r;
        }
    }
}

static void drain_sock(int fd, int sockidx)
{
    static unsigned char bufs[BATCH][PKT_MAX];
    static char ctl[BATCH][128];
    static struct mmsghdr msgs[BATCH];
    static struct iovec iovs[BATCH];
    for (;;) {
        for (int k = 0; k < BATCH; k++) {
            iovs[k].iov_base = bufs[k];
            iovs[k].iov_len = PKT_MAX;
            memset(&msgs[k].msg_hdr, 0, sizeof(msgs[k].msg_hdr));
            msgs[k].msg_hdr.msg_iov = &iovs[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
            msgs[k].msg_hdr.msg_control = ctl[k];
            msgs[k].msg_hdr.msg_controllen = sizeof(ctl[k]);
        }
        int r = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (r < 0) {
            if (errno == EINTR || errno == ECONNREFUSED)
                continue;
            return; /* EAGAIN */
        }
        int64_t fallback = -1;
        for (int k = 0; k < r; k++) {
            int64_t rx = -1;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[k].msg_hdr); c; c = CMSG_NXTHDR(&msgs[k].msg_hdr, c)) {
                if (c->cmsg_level != SOL_SOCKET)
                    continue;
                if (c->cmsg_type == SCM_TIMESTAMPNS) {
                    struct timespec ts;
                    memcpy(&ts, CMSG_DATA(c), sizeof(ts));
                    rx = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
                } else if (c->cmsg_type == SO_RXQ_OVFL) {
                    uint32_t v;
                    memcpy(&v, CMSG_DATA(c), sizeof(v));
                    if (v > rxq_ovfl[sockidx])
                        rxq_ovfl[sockidx] = v;
                }
            }
            if (rx < 0) {
                if (fallback < 0)
                    fallback = now_ns(CLOCK_REALTIME);
                rx = fallback;
            }
            if (msgs[k].msg_len < 12 + sizeof(struct payload)) {
                recv_bad++;
                continue;
            }
            struct payload pl;
            memcpy(&pl, bufs[k] + 12, sizeof(pl));
            if (pl.magic != MAGIC || pl.dir > 1) {
                recv_bad++;
                continue;
            }
            /* sid -> stream index: sessions are numbered 0..nsess-1 locally
             * through sess_id being dense from a base; look it up. */
            uint32_t base = sess_id[0];
            if (pl.sid < base || pl.sid - base >= (uint32_t)nsess || sess_id[pl.sid - base] != pl.sid) {
                recv_bad++;
                continue;
            }
            int j = (int)(pl.sid - base) * 2 + pl.dir;
            if (!pl.measured) {
                recv_unmeasured++;
                continue;
            }
            st_recv[j]++;
            int64_t lat = rx - pl.ts_ns;
            if (lat < 0) {
                hist_neg++;
                lat = 0;
            }
            int64_t b = lat / HIST_BIN_NS;
            if (b >= HIST_BINS)
                hist_over++;
            else
                hist[b]++;
        }
        if (r < BATCH)
            return;
    }
}

int main(int argc, char **argv)
{
    if (argc != 11) {
        fprintf(stderr, "usage: loadgen NSOCK RCVBUF PPS SIZE WARMUP_MS DURATION_MS TAIL_MS DRAIN_MS BIND_IP RELAY_IP\n");
        return 2;
    }
    nsock = atoi(argv[1]);
    int rcvbuf = atoi(argv[2]);
    int pps = atoi(argv[3]);
    pkt_size = atoi(argv[4]);
    int64_t warmup = atoll(argv[5]) * 1000000LL;
    int64_t duration = atoll(argv[6]) * 1000000LL;
    int64_t tail = atoll(argv[7]) * 1000000LL;
    int64_t drain = atoll(argv[8]) * 1000000LL;
    const char *bind_ip = argv[9];
    const char *relay_ip = argv[10];
    if (nsock < 1 || pps < 1 || pkt_size < 12 + (int)sizeof(struct payload) || pkt_size > PKT_MAX)
        return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);

    sock_a = calloc(nsock, sizeof(int));
    sock_b = calloc(nsock, sizeof(int));
    rxq_ovfl = calloc(2 * nsock, sizeof(uint32_t));
    for (int i = 0; i < nsock; i++) {
        sock_a[i] = open_sock(bind_ip, rcvbuf);
        sock_b[i] = open_sock(bind_ip, rcvbuf);
    }
    printf("PORTS ");
    for (int i = 0; i < nsock; i++)
        printf("%s%d", i ? "," : "", port_of(sock_a[i]));
    printf(";");
    for (int i = 0; i < nsock; i++)
        printf("%s%d", i ? "," : "", port_of(sock_b[i]));
    printf("\n");

    if (scanf("%d", &nsess) != 1 || nsess < 1)
        return 3;
    nstreams = 2 * nsess;
    sess_id = calloc(nsess, sizeof(uint32_t));
    st_sock = calloc(nstreams, sizeof(int));
    st_dst = calloc(nstreams, sizeof(struct sockaddr_in));
    st_seq = calloc(nstreams, sizeof(uint16_t));
    st_ts = calloc(nstreams, sizeof(uint32_t));
    st_sent = calloc(nstreams, sizeof(uint64_t));
    st_recv = calloc(nstreams, sizeof(uint64_t));
    struct in_addr rip;
    if (inet_pton(AF_INET, relay_ip, &rip) != 1)
        return 3;
    for (int i = 0; i < nsess; i++) {
        unsigned sid;
        int ia, ib, pa, pb;
        if (scanf("%u %d %d %d %d", &sid, &ia, &ib, &pa, &pb) != 5)
            return 3;
        if (ia < 0 || ia >= nsock || ib < 0 || ib >= nsock)
            return 3;
        sess_id[i] = sid;
        for (int d = 0; d < 2; d++) {
            int j = 2 * i + d;
            st_sock[j] = d == 0 ? sock_a[ia] : sock_b[ib];
            st_dst[j].sin_family = AF_INET;
            st_dst[j].sin_addr = rip;
            st_dst[j].sin_port = htons(d == 0 ? pa : pb);
            st_seq[j] = (uint16_t)(j * 7919);
            st_ts[j] = (uint32_t)j * 104729u;
        }
    }
    for (int i = 1; i < nsess; i++)
        if (sess_id[i] != sess_id[0] + (uint32_t)i)
            return 3; /* session ids must be dense */

    int64_t period = 1000000000LL / pps;
    nslots = (int)(period / TICK_NS);
    if (nslots < 1)
        nslots = 1;
    slot_list = calloc(nslots, sizeof(int *));
    slot_len = calloc(nslots, sizeof(int));
    for (int j = 0; j < nstreams; j++)
        slot_len[j % nslots]++;
    for (int s = 0; s < nslots; s++) {
        slot_list[s] = calloc(slot_len[s] + 1, sizeof(int));
        slot_len[s] = 0;
    }
    for (int j = 0; j < nstreams; j++) {
        int s = j % nslots;
        slot_list[s][slot_len[s]++] = j;
    }
    for (int s = 0; s < nslots; s++)
        qsort(slot_list[s], slot_len[s], sizeof(int), cmp_by_sock);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event ev;
    ev.events = EPOLLIN;
    ev.data.u32 = 0xffffffffu;
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    for (int i = 0; i < 2 * nsock; i++) {
        ev.events = EPOLLIN;
        ev.data.u32 = (uint32_t)i;
        epoll_ctl(ep, EPOLL_CTL_ADD, i < nsock ? sock_a[i] : sock_b[i - nsock], &ev);
    }
    int64_t t0 = now_ns(CLOCK_MONOTONIC) + 2 * TICK_NS;
    struct itimerspec its;
    its.it_value.tv_sec = t0 / 1000000000LL;
    its.it_value.tv_nsec = t0 % 1000000000LL;
    its.it_interval.tv_sec = 0;
    its.it_interval.tv_nsec = TICK_NS;
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);

    int64_t total_ticks = (warmup + duration + tail) / TICK_NS;
    int64_t win_start = warmup / TICK_NS, win_end = (warmup + duration) / TICK_NS;
    int64_t next_tick = 0;
    int64_t stop_at = t0 + total_ticks * TICK_NS + drain;
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    int started = 0, ended = 0;
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(ep, evs, 64, 50);
        int64_t now = now_ns(CLOCK_MONOTONIC);
        for (int k = 0; k < n; k++) {
            uint32_t id = evs[k].data.u32;
            if (id == 0xffffffffu) {
                uint64_t exp;
                if (read(tfd, &exp, sizeof(exp)) < 0) { /* spurious */ }
                continue;
            }
            drain_sock(id < (uint32_t)nsock ? sock_a[id] : sock_b[id - nsock], (int)id);
        }
        while (next_tick < total_ticks && t0 + next_tick * TICK_NS <= now) {
            int64_t late = now - (t0 + next_tick * TICK_NS);
            if (late > max_late_ns)
                max_late_ns = late;
            if (late > 5 * TICK_NS)
                late_ticks++;
            if (next_tick == win_start && !started) {
                printf("START %lld\n", (long long)now_ns(CLOCK_REALTIME));
                started = 1;
            }
            if (next_tick == win_end && !ended) {
                printf("END %lld\n", (long long)now_ns(CLOCK_REALTIME));
                ended = 1;
            }
            int measured = next_tick >= win_start && next_tick < win_end;
            send_slot((int)(next_tick % nslots), measured);
            next_tick++;
            now = now_ns(CLOCK_MONOTONIC);
        }
        if (next_tick >= total_ticks && now >= stop_at)
            break;
    }
    if (!started)
        printf("START %lld\n", (long long)now_ns(CLOCK_REALTIME));
    if (!ended)
        printf("END %lld\n", (long long)now_ns(CLOCK_REALTIME));
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) + (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    double wall = (now_ns(CLOCK_MONOTONIC) - t0) / 1e9;

    uint64_t sent = 0, recv = 0;
    for (int j = 0; j < nstreams; j++) {
        sent += st_sent[j];
        recv += st_recv[j] > st_sent[j] ? st_sent[j] : st_recv[j];
    }
    uint64_t ovfl = 0;
    for (int i = 0; i < 2 * nsock; i++)
        ovfl += rxq_ovfl[i];
    printf("RESULT {\"sent\":%llu,\"recv\":%llu,\"recv_unmeasured\":%llu,\"bad\":%llu,\"send_err\":%llu,"
           "\"send_partial\":%llu,\"late_ticks\":%llu,\"max_late_ns\":%lld,\"rxq_ovfl\":%llu,"
           "\"cpu_s\":%.6f,\"wall_s\":%.6f,\"hist_bin_ns\":%lld,\"hist_over\":%llu,\"hist_neg\":%llu,",
           (unsigned long long)sent, (unsigned long long)recv, (unsigned long long)recv_unmeasured,
           (unsigned long long)recv_bad, (unsigned long long)send_err, (unsigned long long)send_partial,
           (unsigned long long)late_ticks, (long long)max_late_ns, (unsigned long long)ovfl, cpu, wall,
           (long long)HIST_BIN_NS, (unsigned long long)hist_over, (unsigned long long)hist_neg);
    printf("\"hist\":[");
    int first = 1;
    for (int b = 0; b < HIST_BINS; b++)
        if (hist[b]) {
            printf("%s[%d,%llu]", first ? "" : ",", b, (unsigned long long)hist[b]);
            first = 0;
        }
    printf("],\"lossy\":[");
    first = 1;
    for (int j = 0; j < nstreams; j++)
        if (st_recv[j] < st_sent[j]) {
            printf("%s[%u,%d,%llu]", first ? "" : ",", sess_id[j / 2], j & 1,
                   (unsigned long long)(st_sent[j] - st_recv[j]));
            first = 0;
        }
    printf("]}\n");
    return 0;
}
