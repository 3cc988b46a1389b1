/*
 * netecho: a host at ip= on the first virtio-net NIC.  Answers ARP and ICMP
 * echo for its address and echoes UDP to port 7, until it has handled n=
 * frames (0: no limit) or timeout_ms= has passed since the last frame
 * (10000; 0: never).  Prints its counts and exits 0; 2 on bad options or
 * no NIC.
 *
 * Options: ip= (required), n=, timeout_ms=, mrg=0 (no MRG_RXBUF),
 * rxbuf=BYTES (receive buffer size), nic= (which virtio-net, 0).  Run at cpl=3.
 */
#include "guest.h"
#include "inet.h"
#include "vnet.h"

static uint8_t frame[2048];

int main(void)
{
	struct vnet nic;
	struct inet host;
	struct inet_packet pkt;
	char ipstr[32], ipfmt[16], mac[18];
	uint32_t ip;
	uint64_t n = opt_u64("n", 0), timeout_ms = opt_u64("timeout_ms", 10000), frames = 0;
	uint64_t ticks_per_ms = tsc_hz() / 1000, last;

	if (!opt_str("ip", ipstr, sizeof(ipstr)) || !inet_parse_ip(ipstr, &ip)) {
		printf("netecho: give ip=A.B.C.D\n");
		return 2;
	}
	if (vnet_open(&nic, (int)opt_u64("nic", 0), opt_u64("mrg", 1) ? 0 : VNET_OPT_NO_MRG_RXBUF,
		      (uint32_t)opt_u64("rxbuf", 0)) < 0)
		return 2;
	inet_init(&host, &nic, ip);
	inet_format_ip(ip, ipfmt);
	vnet_format_mac(nic.mac, mac);
	printf("netecho: ip %s mac %s ready\n", ipfmt, mac);
	last = rdtsc();
	while (!n || frames < n) {
		int len = vnet_recv(&nic, frame, sizeof(frame));

		vnet_reclaim(&nic);
		if (len == 0) {
			if (timeout_ms && rdtsc() - last > timeout_ms * ticks_per_ms)
				break;
			cpu_relax();
			continue;
		}
		last = rdtsc();
		frames++;
		if (len > 0)
			inet_input(&host, frame, len, 1, &pkt);
	}
	printf("netecho: frames %lu arp %lu icmp %lu udp %lu other %lu rx_errors %lu\n", frames,
	       host.arp_answered, host.icmp_answered, host.udp_echoed, host.other, nic.rx_errors);
	return 0;
}
