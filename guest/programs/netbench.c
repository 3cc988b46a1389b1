/*
 * netbench: frames as fast as the rings allow, timed with the TSC.
 *
 *   mode=tx: sends n= frames (100000) of size= bytes (64, 60-1514) to
 *            dst_mac= (ff:ff:ff:ff:ff:ff), ethertype 0x88b5 (local
 *            experimental), each carrying its sequence number; when the
 *            transmit ring is full it reclaims and tries again.
 *   mode=rx: counts frames of that ethertype until n= have arrived, or
 *            idle_ms= (1000) passed without one after the first.
 *
 * Prints one line:
 *   netbench: mode=tx|rx size=S frames=F bytes=B ticks=T tsc_hz=H lost=L
 * (ticks from the first frame to the last; lost: rx only, gaps in the
 * sequence numbers).  Exit 0, 2 on bad options or no NIC.  Options also:
 * mrg=0, rxbuf=, nic=.  Run at cpl=3.
 */
#include "guest.h"
#include "vnet.h"

#define ETHERTYPE 0x88b5

static uint8_t frame[2048];

static int parse_mac(const char *s, uint8_t *mac)
{
	for (int i = 0; i < 6; i++) {
		unsigned int v = 0;

		for (int d = 0; d < 2; d++, s++) {
			unsigned int c = (unsigned char)*s | 0x20;

			if (c >= '0' && c <= '9')
				v = v * 16 + (c - '0');
			else if (c >= 'a' && c <= 'f')
				v = v * 16 + (c - 'a' + 10);
			else
				return 0;
		}
		mac[i] = (uint8_t)v;
		if (i < 5 && *s++ != ':')
			return 0;
	}
	return 1;
}

int main(void)
{
	struct vnet nic;
	char mode[8] = "tx", macstr[32];
	uint8_t dst[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	uint64_t n = opt_u64("n", 100000), size = opt_u64("size", 64), frames = 0, bytes = 0, lost = 0;
	uint64_t first = 0, last = 0, idle = opt_u64("idle_ms", 1000) * (tsc_hz() / 1000), expect = 0;

	opt_str("mode", mode, sizeof(mode));
	if ((strcmp(mode, "tx") && strcmp(mode, "rx")) || size < 60 || size > 1514 ||
	    (opt_str("dst_mac", macstr, sizeof(macstr)) && !parse_mac(macstr, dst))) {
		printf("netbench: give mode=tx|rx, size=60..1514, dst_mac=aa:bb:cc:dd:ee:ff\n");
		return 2;
	}
	if (vnet_open(&nic, (int)opt_u64("nic", 0), opt_u64("mrg", 1) ? 0 : VNET_OPT_NO_MRG_RXBUF,
		      (uint32_t)opt_u64("rxbuf", 0)) < 0)
		return 2;
	if (!strcmp(mode, "tx")) {
		memcpy(frame, dst, 6);
		memcpy(frame + 6, nic.mac, 6);
		frame[12] = ETHERTYPE >> 8;
		frame[13] = ETHERTYPE & 0xff;
		memset(frame + 22, 0x5a, size - 22);
		first = rdtsc();
		while (frames < n) {
			memcpy(frame + 14, &frames, 8);
			if (vnet_send(&nic, frame, (uint32_t)size) < 0) {
				vnet_reclaim(&nic);
				cpu_relax();
				continue;
			}
			frames++;
			bytes += size;
		}
		last = rdtsc();
	} else {
		for (;;) {
			int len = vnet_recv(&nic, frame, sizeof(frame));

			if (len <= 0) {
				if (frames && rdtsc() - last > idle)
					break;
				cpu_relax();
				continue;
			}
			if (len < 22 || frame[12] != ETHERTYPE >> 8 || frame[13] != (ETHERTYPE & 0xff))
				continue;
			uint64_t seq;

			memcpy(&seq, frame + 14, 8);
			last = rdtsc();
			if (!frames)
				first = last;
			else if (seq > expect)
				lost += seq - expect;
			expect = seq + 1;
			frames++;
			bytes += (uint64_t)len;
			if (frames >= n)
				break;
		}
	}
	printf("netbench: mode=%s size=%lu frames=%lu bytes=%lu ticks=%lu tsc_hz=%lu lost=%lu\n", mode, size,
	       frames, bytes, last - first, tsc_hz(), lost);
	return 0;
}
