/*
 * Just enough Ethernet/ARP/IPv4/ICMP/UDP for the network programs: answer
 * ARP and ICMP echo for our address, resolve a peer, send echo requests and
 * UDP datagrams.  See lib/inet.c.
 */
#ifndef GUEST_INET_H
#define GUEST_INET_H

#include <stdint.h>

#include "vnet.h"

#define INET_ARP_SLOTS 8

struct inet {
	struct vnet *nic;
	uint32_t ip;                         /* host byte order */
	struct { uint32_t ip; uint8_t mac[6]; } arp[INET_ARP_SLOTS];
	unsigned int arp_next;
	uint64_t arp_answered, icmp_answered, udp_echoed, other;
};

/* What inet_input found in a frame. */
enum inet_kind {
	INET_NONE = 0,       /* nothing for us (other host, other protocol, malformed) */
	INET_ARP,            /* an ARP request for us (answered) or a reply (learned) */
	INET_ECHO_REQUEST,   /* ICMP echo request for us (answered) */
	INET_ECHO_REPLY,     /* ICMP echo reply for us: id/seq set */
	INET_UDP,            /* UDP for us: ports, data/len set (answered if port 7 and echo_udp) */
};

struct inet_packet {
	enum inet_kind kind;
	uint32_t src_ip;
	uint16_t id, seq;                      /* echo */
	uint16_t sport, dport;                 /* UDP */
	const uint8_t *data;
	uint32_t len;
};

/* "10.0.0.1" -> host-order address; 0 on failure. */
int inet_parse_ip(const char *s, uint32_t *out);
void inet_format_ip(uint32_t ip, char *out /* 16 bytes */);

void inet_init(struct inet *s, struct vnet *nic, uint32_t ip);

/* Handles one received frame; answers ARP requests and ICMP echo requests
 * for s->ip (and UDP to port 7 when echo_udp), learns ARP replies. */
enum inet_kind inet_input(struct inet *s, const uint8_t *frame, int len, int echo_udp,
			  struct inet_packet *pkt);

/* The MAC for ip if known (copied into mac): 1, else 0. */
int inet_lookup(struct inet *s, uint32_t ip, uint8_t *mac);

/* Sends an ARP request for ip. */
int inet_send_arp_request(struct inet *s, uint32_t ip);

/* Sends an ICMP echo request (payload of len bytes) to ip at mac. */
int inet_send_echo(struct inet *s, const uint8_t *mac, uint32_t ip, uint16_t id, uint16_t seq,
		   const void *payload, uint32_t len);

#endif
