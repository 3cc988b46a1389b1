/*
 * ping: from ip= on the first virtio-net NIC, for each address in dst=
 * (comma-separated, up to 8): resolves it with ARP (a request every 100 ms
 * for up to arp_ms=, 5000), then sends count= ICMP echo requests (size=
 * payload bytes, 56), one at a time, each waiting up to timeout_ms= (1000)
 * for its reply.  rounds= (1) repeats all that, gap_ms= (0) apart; after
 * the last round it keeps answering for linger_ms= (0).  It prints a line
 * per round and destination, then
 *   ping: N/M replies, rtt min/avg/max = a/b/c us
 * timed with the TSC.  Answers ARP and echo requests all along.  Exit 0
 * only if every reply came back; 1 otherwise; 2 on bad options or no NIC.
 *
 * Options: ip=, dst= (required), count=, size=, timeout_ms=, arp_ms=,
 * rounds=, gap_ms=, linger_ms=, mrg=0, rxbuf=, nic=.  Run at cpl=3.
 */
#include "guest.h"
#include "inet.h"
#include "vnet.h"

static uint8_t frame[2048];
static uint8_t payload[1400];

/* Receive and handle frames for up to `ticks`; stop early when `want` is seen
 * (an echo reply with this seq, or the peer's MAC).  1 if seen. */
static int pump(struct vnet *nic, struct inet *host, uint64_t ticks, int want_reply, uint16_t seq, uint32_t dst)
{
	uint64_t start = rdtsc();
	struct inet_packet pkt;
	uint8_t mac[6];

	while (rdtsc() - start < ticks) {
		int len = vnet_recv(nic, frame, sizeof(frame));

		vnet_reclaim(nic);
		if (len <= 0) {
			cpu_relax();
			continue;
		}
		enum inet_kind kind = inet_input(host, frame, len, 0, &pkt);

		if (want_reply && kind == INET_ECHO_REPLY && pkt.src_ip == dst && pkt.id == 0xa1c && pkt.seq == seq)
			return 1;
		if (!want_reply && inet_lookup(host, dst, mac))
			return 1;
	}
	return 0;
}

#define MAX_DST 8

int main(void)
{
	struct vnet nic;
	struct inet host;
	char ipstr[32], dststr[160], name[16];
	uint32_t ip, dsts[MAX_DST];
	int ndst = 0;
	uint64_t count = opt_u64("count", 10), size = opt_u64("size", 56), rounds = opt_u64("rounds", 1);
	uint64_t hz = tsc_hz(), ms = hz / 1000, timeout = opt_u64("timeout_ms", 1000) * ms;
	uint64_t arp_tries = opt_u64("arp_ms", 5000) / 100, gap = opt_u64("gap_ms", 0) * ms;
	uint64_t linger = opt_u64("linger_ms", 0) * ms;
	uint64_t replies = 0, sent = 0, min = ~0ull, max = 0, sum = 0;
	uint8_t mac[6];

	if (opt_str("dst", dststr, sizeof(dststr))) {
		for (char *p = dststr; *p && ndst < MAX_DST;) {
			if (!inet_parse_ip(p, &dsts[ndst]))
				break;
			ndst++;
			while (*p && *p != ',')
				p++;
			if (*p == ',')
				p++;
			else
				break;
		}
	}
	if (!opt_str("ip", ipstr, sizeof(ipstr)) || !inet_parse_ip(ipstr, &ip) || !ndst ||
	    size > sizeof(payload) || !rounds) {
		printf("ping: give ip=A.B.C.D dst=A.B.C.D[,E.F.G.H...] [count=N size<=1400]\n");
		return 2;
	}
	if (vnet_open(&nic, (int)opt_u64("nic", 0), opt_u64("mrg", 1) ? 0 : VNET_OPT_NO_MRG_RXBUF,
		      (uint32_t)opt_u64("rxbuf", 0)) < 0)
		return 2;
	inet_init(&host, &nic, ip);
	for (uint64_t i = 0; i < size; i++)
		payload[i] = (uint8_t)i;
	for (uint64_t round = 1; round <= rounds; round++) {
		if (round > 1)
			pump(&nic, &host, gap, 0, 0, 0);
		for (int d = 0; d < ndst; d++) {
			uint32_t dst = dsts[d];
			uint64_t got = 0;

			inet_format_ip(dst, name);
			for (uint64_t tries = 0; !inet_lookup(&host, dst, mac) && tries < arp_tries; tries++) {
				inet_send_arp_request(&host, dst);
				pump(&nic, &host, hz / 10, 0, 0, dst);
			}
			if (inet_lookup(&host, dst, mac)) {
				for (uint64_t seq = 1; seq <= count; seq++) {
					uint64_t t0 = rdtsc();

					if (inet_send_echo(&host, mac, dst, 0xa1c, (uint16_t)seq, payload,
							   (uint32_t)size) < 0)
						continue;
					if (pump(&nic, &host, timeout, 1, (uint16_t)seq, dst)) {
						uint64_t rtt = rdtsc() - t0;

						got++;
						sum += rtt;
						min = rtt < min ? rtt : min;
						max = rtt > max ? rtt : max;
					}
				}
			} else {
				printf("ping: no ARP reply from %s\n", name);
			}
			replies += got;
			sent += count;
			if (rounds > 1 || ndst > 1)
				printf("ping: round %lu to %s: %lu/%lu replies\n", round, name, got, count);
		}
	}
	uint64_t per_us = hz / 1000000;

	if (replies)
		printf("ping: %lu/%lu replies, rtt min/avg/max = %lu/%lu/%lu us\n", replies, sent, min / per_us,
		       sum / replies / per_us, max / per_us);
	else
		printf("ping: 0/%lu replies\n", sent);
	pump(&nic, &host, linger, 0, 0, 0);
	return replies == sent ? 0 : 1;
}
