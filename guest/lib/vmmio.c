/*
 * virtio-mmio transport discovery (see include/vmmio.h).
 */
#include "guest.h"
#include "virtio.h"
#include "vmmio.h"

#define ANNOUNCED_MAX   16
#define CMDLINE_KEY     "virtio_mmio.device="

static int slot_of(uintptr_t base)
{
	if (base < VIRTIO_MMIO_BASE || (base - VIRTIO_MMIO_BASE) % VIRTIO_MMIO_STRIDE)
		return -1;
	uintptr_t i = (base - VIRTIO_MMIO_BASE) / VIRTIO_MMIO_STRIDE;

	return i < VIRTIO_MMIO_SLOTS ? (int)i : -1;
}

/* A number as Linux's memparse reads it: decimal or 0x hex, then an
 * optional K/M/G.  Returns the first character after it, or NULL. */
static const char *parse_size(const char *p, uint64_t *out)
{
	uint64_t v = 0;
	unsigned int base = 10, digits = 0;

	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		base = 16;
		p += 2;
	}
	for (;; p++) {
		unsigned int c = (unsigned char)*p, d;

		if (c >= '0' && c <= '9')
			d = c - '0';
		else if (base == 16 && (c | 0x20) >= 'a' && (c | 0x20) <= 'f')
			d = (c | 0x20) - 'a' + 10;
		else
			break;
		v = v * base + d;
		digits++;
	}
	if (!digits || digits > 16)
		return NULL;
	switch (*p | 0x20) {
	case 'k':
		v <<= 10;
		p++;
		break;
	case 'm':
		v <<= 20;
		p++;
		break;
	case 'g':
		v <<= 30;
		p++;
		break;
	}
	*out = v;
	return p;
}

static int is_end(char c)
{
	return c == '\0' || c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Parses "<size>@<base>:<irq>[:<id>]" (the value of one announcement).
 * Returns 0, -1 if malformed, -2 if the driver can't use it. */
static int parse_announcement(const char *p, uint32_t min_size, struct vmmio_transport *t)
{
	uint64_t size, base, irq;

	p = parse_size(p, &size);
	if (!p || *p++ != '@')
		return -1;
	p = parse_size(p, &base);
	if (!p || *p++ != ':')
		return -1;
	p = parse_size(p, &irq);
	if (!p || !(is_end(*p) || *p == ':'))
		return -1;
	/* Only the low 4 GiB are mapped. */
	if (size < min_size || base % 4 || base >= (1ull << 32) ||
	    size > (1ull << 32) - base)
		return -2;
	t->base = (uintptr_t)base;
	t->irq = (int)irq;
	t->slot = slot_of(t->base);
	t->announced = 1;
	return 0;
}

/* Transports to try, in order: those announced on the command line
 * ("virtio_mmio.device=...", as QEMU microvm and aiokvm add them; the first
 * announced is the first device given), then the standard slots that were
 * not announced, from slot 0 up.  Returns how many; *nannounced = how many
 * came from the command line. */
static int list_transports(const char *who, uint32_t min_size, struct vmmio_transport *t,
			   int *nannounced)
{
	const char *p = boot_cmdline();
	size_t klen = strlen(CMDLINE_KEY);
	int n = 0;

	while (*p) {
		while (*p && is_end(*p))
			p++;
		const char *tok = p;

		while (!is_end(*p))
			p++;
		if ((size_t)(p - tok) <= klen || strncmp(tok, CMDLINE_KEY, klen) != 0)
			continue;
		if (n == ANNOUNCED_MAX) {
			printf("%s: more than %d virtio-mmio "
			       "announcements, the rest ignored\n", who, ANNOUNCED_MAX);
			break;
		}
		int r = parse_announcement(tok + klen, min_size, &t[n]);

		if (r < 0) {
			char bad[64];
			size_t len = (size_t)(p - tok) < sizeof(bad) - 1 ?
				     (size_t)(p - tok) : sizeof(bad) - 1;

			memcpy(bad, tok, len);
			bad[len] = '\0';
			printf("%s: ignoring \"%s\": ", who, bad);
			if (r == -1)
				printf("malformed (SIZE@BASE:IRQ)\n");
			else
				printf("unusable (needs 4-byte alignment, size "
				       ">= 0x%x, below 4 GiB)\n", min_size);
			continue;
		}
		int dup = 0;

		for (int i = 0; i < n; i++)
			dup |= t[i].base == t[n].base;
		if (!dup)
			n++;
	}
	*nannounced = n;
	for (int slot = 0; slot < VIRTIO_MMIO_SLOTS; slot++) {
		uintptr_t base = VIRTIO_MMIO_BASE + (uintptr_t)slot * VIRTIO_MMIO_STRIDE;
		int dup = 0;

		for (int i = 0; i < *nannounced; i++)
			dup |= t[i].base == base;
		if (dup)
			continue;
		t[n].base = base;
		t[n].irq = 5 + slot;
		t[n].slot = slot;
		t[n].announced = 0;
		n++;
	}
	return n;
}

void vmmio_print_where(const struct vmmio_transport *t)
{
	if (t->slot >= 0)
		printf("slot %d at 0x%lx", t->slot, (unsigned long)t->base);
	else
		printf("transport at 0x%lx", (unsigned long)t->base);
}

/* An empty slot (QEMU microvm) has the magic and DeviceID 0; nothing at
 * all reads as all-ones (aiokvm) or zero. */
int vmmio_find(uint32_t id, int index, const char *who, uint32_t min_size,
	       struct vmmio_transport *out, int *nannounced)
{
	struct vmmio_transport t[ANNOUNCED_MAX + VIRTIO_MMIO_SLOTS];
	int n = list_transports(who, min_size, t, nannounced);

	for (int i = 0; i < n; i++) {
		uint32_t magic = mmio_read32(t[i].base + VMMIO_MAGIC);
		uint32_t version;

		if (magic != VIRTIO_MAGIC_VALUE) {
			if (t[i].announced)
				printf("%s: nothing at announced 0x%lx "
				       "(MagicValue 0x%x)\n", who,
				       (unsigned long)t[i].base, magic);
			continue;
		}
		if (mmio_read32(t[i].base + VMMIO_DEVICE_ID) != id)
			continue;   /* 0: empty transport slot; else another device */
		version = mmio_read32(t[i].base + VMMIO_VERSION);
		if (version != 2) {
			printf("%s: ", who);
			vmmio_print_where(&t[i]);
			if (version == 1)
				printf(" is a legacy (Version 1) device: "
				       "unsupported, skipped\n");
			else
				printf(" has unknown version %u, skipped\n",
				       version);
			continue;
		}
		if (index-- > 0)
			continue;
		*out = t[i];
		return 0;
	}
	return -1;
}
