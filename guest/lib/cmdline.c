/* Command line option parsing: whitespace-separated "key[=value]" tokens. */
#include "guest.h"

static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Finds key; on success sets *val and *vlen to the value (empty if none). */
static int find_opt(const char *key, const char **val, size_t *vlen)
{
	const char *p = boot_cmdline();
	size_t klen = strlen(key);
	int found = 0;

	while (*p) {
		while (is_space(*p))
			p++;
		const char *tok = p;

		while (*p && !is_space(*p))
			p++;
		size_t tlen = (size_t)(p - tok);

		if (tlen >= klen && strncmp(tok, key, klen) == 0 &&
		    (tlen == klen || tok[klen] == '=')) {
			/* Last occurrence wins, like most kernels. */
			found = 1;
			*val = tok + klen + (tlen > klen ? 1 : 0);
			*vlen = tlen > klen ? tlen - klen - 1 : 0;
		}
	}
	return found;
}

int opt_present(const char *key)
{
	const char *v;
	size_t n;

	return find_opt(key, &v, &n);
}

int opt_str(const char *key, char *out, size_t outlen)
{
	const char *v;
	size_t n;

	if (!find_opt(key, &v, &n))
		return 0;
	if (outlen) {
		if (n >= outlen)
			n = outlen - 1;
		memcpy(out, v, n);
		out[n] = '\0';
	}
	return 1;
}

int parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	unsigned int base = 10;
	int digits = 0;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (; *s; s++) {
		unsigned int d;

		if (*s >= '0' && *s <= '9')
			d = (unsigned int)(*s - '0');
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = (unsigned int)(*s - 'a' + 10);
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = (unsigned int)(*s - 'A' + 10);
		else
			return 0;
		v = v * base + d;
		digits++;
	}
	if (!digits)
		return 0;
	*out = v;
	return 1;
}

uint64_t opt_u64(const char *key, uint64_t def)
{
	char buf[32];
	uint64_t v;

	if (!opt_str(key, buf, sizeof(buf)))
		return def;
	if (!parse_u64(buf, &v)) {
		printf("warning: bad number for option %s=%s\n", key, buf);
		return def;
	}
	return v;
}
