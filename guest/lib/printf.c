/*
 * Small printf: %d %i %u %x %X %o %p %s %c %%, flags '-' and '0',
 * field width (number or '*'), precision for %s, length h/hh/l/ll/z/j.
 */
#include "guest.h"

struct sink {
	void (*put)(struct sink *, char);
	char *buf;
	size_t size;
	size_t pos;
	int count;
};

static void emit(struct sink *s, char c)
{
	s->put(s, c);
	s->count++;
}

static void pad(struct sink *s, char c, int n)
{
	while (n-- > 0)
		emit(s, c);
}

static void fmt_number(struct sink *s, uint64_t v, int neg, unsigned int base,
		       int upper, int width, int zero, int left,
		       const char *prefix)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char tmp[24];
	int n = 0, plen = prefix ? (int)strlen(prefix) : 0;

	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);

	int len = n + (neg ? 1 : 0) + plen;

	if (!left && !zero)
		pad(s, ' ', width - len);
	if (neg)
		emit(s, '-');
	for (int i = 0; i < plen; i++)
		emit(s, prefix[i]);
	if (!left && zero)
		pad(s, '0', width - len);
	while (n)
		emit(s, tmp[--n]);
	if (left)
		pad(s, ' ', width - len);
}

static int format(struct sink *s, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			emit(s, *fmt);
			continue;
		}
		fmt++;

		int left = 0, zero = 0, width = 0, prec = -1, lng = 0;

		for (;; fmt++) {
			if (*fmt == '-')
				left = 1;
			else if (*fmt == '0')
				zero = 1;
			else
				break;
		}
		if (*fmt == '*') {
			width = va_arg(ap, int);
			if (width < 0) {
				left = 1;
				width = -width;
			}
			fmt++;
		} else {
			while (*fmt >= '0' && *fmt <= '9')
				width = width * 10 + (*fmt++ - '0');
		}
		if (*fmt == '.') {
			fmt++;
			prec = 0;
			if (*fmt == '*') {
				prec = va_arg(ap, int);
				fmt++;
			} else {
				while (*fmt >= '0' && *fmt <= '9')
					prec = prec * 10 + (*fmt++ - '0');
			}
		}
		for (;; fmt++) {
			if (*fmt == 'l' || *fmt == 'z' || *fmt == 'j')
				lng++;
			else if (*fmt != 'h')
				break;
		}

		uint64_t u;
		int64_t d;

		switch (*fmt) {
		case 'd':
		case 'i':
			d = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
			u = d < 0 ? (uint64_t)0 - (uint64_t)d : (uint64_t)d;
			fmt_number(s, u, d < 0, 10, 0, width, zero, left, NULL);
			break;
		case 'u':
		case 'x':
		case 'X':
		case 'o':
			u = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned int);
			fmt_number(s, u, 0,
				   *fmt == 'u' ? 10 : *fmt == 'o' ? 8 : 16,
				   *fmt == 'X', width, zero, left, NULL);
			break;
		case 'p':
			u = (uintptr_t)va_arg(ap, void *);
			fmt_number(s, u, 0, 16, 0, width, zero, left, "0x");
			break;
		case 'c': {
			char c = (char)va_arg(ap, int);

			if (!left)
				pad(s, ' ', width - 1);
			emit(s, c);
			if (left)
				pad(s, ' ', width - 1);
			break;
		}
		case 's': {
			const char *str = va_arg(ap, const char *);
			int len = 0;

			if (!str)
				str = "(null)";
			while (str[len] && (prec < 0 || len < prec))
				len++;
			if (!left)
				pad(s, ' ', width - len);
			for (int i = 0; i < len; i++)
				emit(s, str[i]);
			if (left)
				pad(s, ' ', width - len);
			break;
		}
		case '%':
			emit(s, '%');
			break;
		case '\0':
			return s->count;
		default:
			emit(s, '%');
			emit(s, *fmt);
			break;
		}
	}
	return s->count;
}

static void put_serial(struct sink *s, char c)
{
	(void)s;
	serial_putc(c);
}

static void put_buf(struct sink *s, char c)
{
	if (s->pos + 1 < s->size)
		s->buf[s->pos] = c;
	s->pos++;
}

static spinlock_t console_lock;

int vprintf(const char *fmt, va_list ap)
{
	struct sink s = { .put = put_serial };
	int n;

	spin_lock(&console_lock);
	n = format(&s, fmt, ap);
	spin_unlock(&console_lock);
	return n;
}

int printf(const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vprintf(fmt, ap);
	va_end(ap);
	return n;
}

int printf_nolock(const char *fmt, ...)
{
	struct sink s = { .put = put_serial };
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = format(&s, fmt, ap);
	va_end(ap);
	return n;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct sink s = { .put = put_buf, .buf = buf, .size = size };
	int n = format(&s, fmt, ap);

	if (size)
		buf[s.pos < size ? s.pos : size - 1] = '\0';
	return n;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}
