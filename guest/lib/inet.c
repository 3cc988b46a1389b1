/*
 * Minimal ARP / IPv4 / ICMP / UDP (see include/inet.h).  Frames are built
 * in a stack buffer and sent through the virtio-net driver.  Everything
 * from the network is checked for length before it is read.
 */
#include "guest.h"
#include "inet.h"

#define ETH_HLEN 14
#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_ARP 0x0806
#define IP_HLEN 20
#define PROTO_ICMP 1
#define PROTO_UDP 17

static const uint8_t broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }

static uint16_t checksum(const uint8_t *p, uint32_t len, uint32_t sum)
{
	for (; len > 1; p += 2, len -= 2)
		sum += (uint32_t)p[0] << 8 | p[1];
	if (len)
		sum += (uint32_t)p[0] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

int inet_parse_ip(const char *s, uint32_t *out)
{
	uint32_t ip = 0;

	for (int part = 0; part < 4; part++) {
		uint32_t v = 0;
		int digits = 0;

		while (*s >= '0' && *s <= '9' && digits < 4) {
			v = v * 10 + (uint32_t)(*s++ - '0');
			digits++;
		}
		if (!digits || v > 255 || (part < 3 && *s++ != '.'))
			return 0;
		ip = ip << 8 | v;
	}
	if (*s && *s != ' ' && *s != ',')   /* the end, or the next in a list */
		return 0;
	*out = ip;
	return 1;
}

void inet_format_ip(uint32_t ip, char *out)
{
	snprintf(out, 16, "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 0xff, (ip >> 8) & 0xff, ip & 0xff);
}

void inet_init(struct inet *s, struct vnet *nic, uint32_t ip)
{
	memset(s, 0, sizeof(*s));
	s->nic = nic;
	s->ip = ip;
}

static void learn(struct inet *s, uint32_t ip, const uint8_t *mac)
{
	for (unsigned int i = 0; i < INET_ARP_SLOTS; i++)
		if (s->arp[i].ip == ip) {
			memcpy(s->arp[i].mac, mac, 6);
			return;
		}
	s->arp[s->arp_next].ip = ip;
	memcpy(s->arp[s->arp_next].mac, mac, 6);
	s->arp_next = (s->arp_next + 1) % INET_ARP_SLOTS;
}

int inet_lookup(struct inet *s, uint32_t ip, uint8_t *mac)
{
	for (unsigned int i = 0; i < INET_ARP_SLOTS; i++)
		if (s->arp[i].ip == ip && ip) {
			memcpy(mac, s->arp[i].mac, 6);
			return 1;
		}
	return 0;
}

static void eth_header(struct inet *s, uint8_t *f, const uint8_t *dst, uint16_t type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, s->nic->mac, 6);
	put16(f + 12, type);
}

static int send_arp(struct inet *s, uint16_t op, const uint8_t *dst_mac, uint32_t target_ip,
		    const uint8_t *target_mac)
{
	uint8_t f[60];

	memset(f, 0, sizeof(f));
	eth_header(s, f, dst_mac, ETHERTYPE_ARP);
	put16(f + 14, 1);              /* Ethernet */
	put16(f + 16, ETHERTYPE_IPV4);
	f[18] = 6;
	f[19] = 4;
	put16(f + 20, op);
	memcpy(f + 22, s->nic->mac, 6);
	put32(f + 28, s->ip);
	memcpy(f + 32, target_mac, 6);
	put32(f + 38, target_ip);
	return vnet_send(s->nic, f, sizeof(f));
}

int inet_send_arp_request(struct inet *s, uint32_t ip)
{
	static const uint8_t zero[6];

	return send_arp(s, 1, broadcast, ip, zero);
}

/* An IPv4 packet with `len` bytes of payload already at f + 34. */
static int send_ipv4(struct inet *s, uint8_t *f, const uint8_t *dst_mac, uint32_t dst_ip, uint8_t proto,
		     uint32_t len)
{
	static uint16_t ident;
	uint32_t total = IP_HLEN + len, frame_len = ETH_HLEN + total;

	eth_header(s, f, dst_mac, ETHERTYPE_IPV4);
	f[14] = 0x45;
	f[15] = 0;
	put16(f + 16, (uint16_t)total);
	put16(f + 18, ident++);
	put16(f + 20, 0x4000);   /* don't fragment */
	f[22] = 64;
	f[23] = proto;
	put16(f + 24, 0);
	put32(f + 26, s->ip);
	put32(f + 30, dst_ip);
	put16(f + 24, checksum(f + 14, IP_HLEN, 0));
	if (frame_len < 60) {
		memset(f + frame_len, 0, 60 - frame_len);
		frame_len = 60;
	}
	return vnet_send(s->nic, f, frame_len);
}

int inet_send_echo(struct inet *s, const uint8_t *mac, uint32_t ip, uint16_t id, uint16_t seq,
		   const void *payload, uint32_t len)
{
	uint8_t f[VNET_FRAME_MAX];
	uint8_t *icmp = f + ETH_HLEN + IP_HLEN;

	if (len > VNET_FRAME_MAX - ETH_HLEN - IP_HLEN - 8)
		return -1;
	icmp[0] = 8;
	icmp[1] = 0;
	put16(icmp + 2, 0);
	put16(icmp + 4, id);
	put16(icmp + 6, seq);
	memcpy(icmp + 8, payload, len);
	put16(icmp + 2, checksum(icmp, 8 + len, 0));
	return send_ipv4(s, f, mac, ip, PROTO_ICMP, 8 + len);
}

static enum inet_kind arp_input(struct inet *s, const uint8_t *f, int len)
{
	if (len < 42 || get16(f + 14) != 1 || get16(f + 16) != ETHERTYPE_IPV4 || f[18] != 6 || f[19] != 4)
		return INET_NONE;
	uint16_t op = get16(f + 20);
	uint32_t sender_ip = get32(f + 28), target_ip = get32(f + 38);

	if (target_ip != s->ip)
		return INET_NONE;
	learn(s, sender_ip, f + 22);
	if (op == 1) {
		send_arp(s, 2, f + 22, sender_ip, f + 22);
		s->arp_answered++;
	}
	return INET_ARP;
}

static enum inet_kind ipv4_input(struct inet *s, const uint8_t *f, int len, int echo_udp,
				 struct inet_packet *pkt)
{
	const uint8_t *ip = f + ETH_HLEN;
	uint32_t ihl, total;

	if (len < ETH_HLEN + IP_HLEN || (ip[0] >> 4) != 4)
		return INET_NONE;
	ihl = (uint32_t)(ip[0] & 0xf) * 4;
	total = get16(ip + 2);
	if (ihl < IP_HLEN || total < ihl || total > (uint32_t)len - ETH_HLEN || checksum(ip, ihl, 0) != 0)
		return INET_NONE;
	if (get32(ip + 16) != s->ip || (get16(ip + 6) & 0x3fff))   /* not ours, or a fragment */
		return INET_NONE;
	const uint8_t *body = ip + ihl;
	uint32_t blen = total - ihl;

	pkt->src_ip = get32(ip + 12);
	learn(s, pkt->src_ip, f + 6);
	if (ip[9] == PROTO_ICMP && blen >= 8 && checksum(body, blen, 0) == 0) {
		pkt->id = get16(body + 4);
		pkt->seq = get16(body + 6);
		pkt->data = body + 8;
		pkt->len = blen - 8;
		if (body[0] == 0)
			return INET_ECHO_REPLY;
		if (body[0] == 8) {
			uint8_t r[VNET_FRAME_MAX];
			uint8_t *icmp = r + ETH_HLEN + IP_HLEN;

			if (blen > sizeof(r) - ETH_HLEN - IP_HLEN)
				return INET_NONE;
			memcpy(icmp, body, blen);
			icmp[0] = 0;
			put16(icmp + 2, 0);
			put16(icmp + 2, checksum(icmp, blen, 0));
			send_ipv4(s, r, f + 6, pkt->src_ip, PROTO_ICMP, blen);
			s->icmp_answered++;
			return INET_ECHO_REQUEST;
		}
		return INET_NONE;
	}
	if (ip[9] == PROTO_UDP && blen >= 8 && get16(body + 4) >= 8 && get16(body + 4) <= blen) {
		uint32_t ulen = get16(body + 4);

		pkt->sport = get16(body);
		pkt->dport = get16(body + 2);
		pkt->data = body + 8;
		pkt->len = ulen - 8;
		if (echo_udp && pkt->dport == 7) {
			uint8_t r[VNET_FRAME_MAX];
			uint8_t *udp = r + ETH_HLEN + IP_HLEN;

			memcpy(udp, body, ulen);
			put16(udp, pkt->dport);
			put16(udp + 2, pkt->sport);
			put16(udp + 6, 0);   /* no checksum: allowed over IPv4 */
			send_ipv4(s, r, f + 6, pkt->src_ip, PROTO_UDP, ulen);
			s->udp_echoed++;
		}
		return INET_UDP;
	}
	return INET_NONE;
}

enum inet_kind inet_input(struct inet *s, const uint8_t *f, int len, int echo_udp, struct inet_packet *pkt)
{
	enum inet_kind kind = INET_NONE;

	memset(pkt, 0, sizeof(*pkt));
	if (len >= ETH_HLEN) {
		uint16_t type = get16(f + 12);

		if (type == ETHERTYPE_ARP)
			kind = arp_input(s, f, len);
		else if (type == ETHERTYPE_IPV4)
			kind = ipv4_input(s, f, len, echo_udp, pkt);
	}
	if (kind == INET_NONE)
		s->other++;
	pkt->kind = kind;
	return kind;
}
