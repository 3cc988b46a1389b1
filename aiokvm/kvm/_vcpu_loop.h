/* The vCPU run loop in C, and the shared slot that hands exits to asyncio.
 *
 * Python calls aiokvm_vcpu_run() from the vCPU thread with the GIL released.
 * It loops on KVM_RUN and finishes in C every exit it can:
 *
 *   - accesses nobody claims (counted; reads return all-ones);
 *   - loop-hosted accesses under a C handoff mechanism: the exit is posted
 *     to the vCPU's slot, the asyncio loop runs the handler and completes
 *     the slot, and this thread waits (spinning, then on a futex) without
 *     ever holding the GIL.
 *
 * It returns to Python only for inline handlers, non-I/O exits, kicks and
 * errors.  Every field Python reads is plain data in struct aiokvm_vcpu.
 *
 * The slot is the only synchronisation between the vCPU thread and the
 * loop.  Its states and who moves them; every move that can race with
 * another thread's is a compare-and-swap:
 *
 *   EMPTY  -> POSTED     vCPU, after writing the access fields (release)
 *   POSTED -> TAKEN      loop, claiming the access (acquire)
 *   TAKEN  -> DONE       loop, after writing the result into kvm_run (release)
 *   DONE   -> EMPTY      vCPU, after reading the result (a plain store: only
 *                        the vCPU ever moves a DONE slot)
 *   EMPTY | POSTED | TAKEN -> CANCELLED   any thread, the machine stopping
 *
 * CANCELLED is final: a claim that finds it does nothing, a completion
 * that loses the race may have written the (unread) result into kvm_run
 * but does not release anyone, and a vCPU that finds it (or fails to post)
 * returns AIOKVM_RC_CANCELLED.
 * The "polling" and "waiting" flags use sequentially consistent accesses so
 * that a poster and a sleeper cannot both miss each other (store flag, then
 * load the other side's flag).
 */
#ifndef AIOKVM_VCPU_LOOP_H
#define AIOKVM_VCPU_LOOP_H

#include <errno.h>
#include <sched.h>
#include <linux/futex.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define AIOKVM_MAX_MMIO_REGIONS 64
#define AIOKVM_MAX_REGIONS 1024 /* = AIOKVM_PACK_REGION_MASK + 1 */
#define AIOKVM_HUB_MAX_VCPUS 64

/* Region modes in the C lookup tables. */
#define AIOKVM_UNCLAIMED 0
#define AIOKVM_INLINE 1
#define AIOKVM_LOOP 2

/* Return codes of aiokvm_vcpu_run (negative: -errno).  AIOKVM_RC_PYTHON comes
 * packed with the access, so Python needs no field reads to dispatch it:
 *   bits 0-3 code, 4-5 op (AIOKVM_OP_*), 6-9 size, 10-19 region id,
 *   20-62 offset within the region.  The same word is in v->packed.
 * The layout is exported to Python (aiokvm/access.py decodes it). */
#define AIOKVM_PACK_CODE_MASK 15
#define AIOKVM_PACK_OP_SHIFT 4
#define AIOKVM_PACK_OP_MASK 3
#define AIOKVM_PACK_SIZE_SHIFT 6
#define AIOKVM_PACK_SIZE_MASK 15
#define AIOKVM_PACK_REGION_SHIFT 10
#define AIOKVM_PACK_REGION_MASK 1023
#define AIOKVM_PACK_OFFSET_SHIFT 20
#define AIOKVM_PACK_OFFSET_BITS 43
#define AIOKVM_RC_PYTHON 1    /* an access for a Python handler */
#define AIOKVM_RC_OTHER 2     /* a non-I/O exit: decode kvm_run */
#define AIOKVM_RC_INTR 3      /* kicked (stop flag or EINTR) */
#define AIOKVM_RC_CANCELLED 4 /* a loop-hosted access was cancelled (machine stopping) */

/* Packed ops. */
#define AIOKVM_OP_READ 0   /* one element of at most 8 bytes: return the value */
#define AIOKVM_OP_WRITE 1  /* one element: v->value holds it */
#define AIOKVM_OP_STRING 2 /* string I/O: decode kvm_run */

/* Access kinds. */
#define AIOKVM_IO_IN 0
#define AIOKVM_IO_OUT 1
#define AIOKVM_MMIO_READ 2
#define AIOKVM_MMIO_WRITE 3

/* Slot states. */
#define AIOKVM_SLOT_EMPTY 0
#define AIOKVM_SLOT_POSTED 1
#define AIOKVM_SLOT_TAKEN 2
#define AIOKVM_SLOT_DONE 3
#define AIOKVM_SLOT_CANCELLED 4

/* Handoff mechanisms. */
#define AIOKVM_MECH_PYTHON 0 /* loop-hosted exits return to Python, which hands off */
#define AIOKVM_MECH_SPIN 1   /* spin (bounded), then futex; loop polls adaptively */
#define AIOKVM_MECH_FUTEX 2  /* block on a futex at once; loop sleeps on the eventfd */
#define AIOKVM_MECH_WAKE 3   /* block on a futex at once; loop polls adaptively */

struct aiokvm_mmio_region {
    uint64_t base;
    uint64_t end;
    uint32_t id;
    uint32_t mode;
};

/* A latency histogram in hdrhistogram's bucket layout (the parameters and
 * the counts array come from an HdrHistogram, see metrics.py), so recording
 * costs a few instructions per exit and the library still does the rest:
 * percentiles, merging, encoding.  Written by one vCPU thread; readers
 * tolerate a value recorded during their read. */
struct aiokvm_hist {
    uint64_t *counts;    /* NULL: not recording */
    uint64_t len;        /* entries in counts */
    uint64_t sub_mask;   /* sub_bucket_mask */
    uint32_t half_mag;   /* sub_bucket_half_count_magnitude */
    uint32_t unit_mag;   /* unit_magnitude */
    uint64_t half_count; /* sub_bucket_half_count */
    uint64_t total;
    uint64_t sum;
    uint64_t max;
    uint64_t clamped; /* values beyond the top bucket, counted there */
};

/* Latency components, in the order of aiokvm_vcpu.hist[]. */
#define AIOKVM_LAT_EXIT_TO_START 0 /* KVM_RUN returned -> handler started */
#define AIOKVM_LAT_HANDLER 1       /* handler ran */
#define AIOKVM_LAT_END_TO_ENTRY 2  /* handler ended -> KVM_RUN entered again */

struct aiokvm_hub {
    uint32_t polling; /* the loop is polling the slots (atomic) */
    int32_t wake_fd;  /* eventfd the loop sleeps on */
    uint32_t nvcpus;
    uint32_t spin_yield; /* spin with sched_yield(): more busy threads than cores */
    uint32_t next_scan;  /* aiokvm_hub_serve's round-robin position */
    int32_t current;     /* the vCPU whose access the loop holds, or -1 */
    uint64_t value;      /* ... and that access's write value (read by Python) */
    uint64_t spin_ns;    /* how long aiokvm_hub_serve spins for the next access */
    struct aiokvm_vcpu *vcpus[AIOKVM_HUB_MAX_VCPUS];
};

struct aiokvm_vcpu {
    int32_t fd;
    uint32_t index;
    struct kvm_run *run;
    struct aiokvm_hub *hub;
    uint16_t *pio_table; /* 65536 entries: id << 2 | mode */
    uint64_t *pio_counts; /* 65536 * 2: [port * 2 + is_out] */
    uint32_t n_mmio;
    uint32_t mech;
    struct aiokvm_mmio_region mmio[AIOKVM_MAX_MMIO_REGIONS];
    uint64_t region_base[AIOKVM_MAX_REGIONS]; /* for offsets in the packed word */
    uint64_t spin_ns;
    uint32_t stop; /* atomic: return AIOKVM_RC_INTR as soon as possible */

    /* The current access, for Python (inline) or the loop (slot). */
    uint32_t kind;
    uint32_t region;
    uint32_t size;
    uint32_t count;
    uint32_t simple; /* one element of at most 8 bytes: value holds/takes it */
    uint64_t addr;
    uint64_t value;
    int64_t packed; /* the access, packed as in AIOKVM_RC_PYTHON */

    uint32_t slot;    /* atomic: AIOKVM_SLOT_* */
    uint32_t waiting; /* atomic: this thread sleeps on the slot futex */
    uint32_t pending_in; /* the next run() writes in_value as the read result */

    /* Counters (written by this vCPU thread only, except where noted). */
    uint64_t exits;
    uint64_t io_exits;
    uint64_t mmio_exits;
    uint64_t other_exits;
    uint64_t intr_exits;
    uint64_t string_io_elements;
    uint64_t unclaimed_pio_reads;
    uint64_t unclaimed_pio_writes;
    uint64_t unclaimed_mmio_reads;
    uint64_t unclaimed_mmio_writes;
    uint64_t to_python;
    uint64_t to_loop;
    uint64_t spin_hits;     /* completed while spinning */
    uint64_t futex_waits;   /* had to sleep */
    uint64_t wakeups_sent;  /* eventfd writes to wake the loop */
    uint64_t wait_ns;       /* time waiting for loop-hosted handlers (spin + sleep) */
    uint64_t spin_wait_ns;  /* ... of which spinning (on-CPU, counted as user time) */
    uint64_t sleep_wait_ns; /* ... of which sleeping on the futex (off-CPU) */
    uint64_t kvm_run_ns;    /* time inside the KVM_RUN ioctl (and finishing unclaimed accesses) */
    uint64_t python_ns;     /* time back in Python between runs */
    uint64_t region_hits[AIOKVM_MAX_REGIONS];

    /* Latency of one of every sample_every exits handled by a handler. */
    uint32_t sample_every;
    uint32_t sample_tick;
    uint64_t t_exit;  /* KVM_RUN returned */
    uint64_t t_start; /* handler started (loop: taken) */
    uint64_t t_end;   /* handler ended (loop: completed) */
    uint64_t t_return; /* returned to Python */
    struct aiokvm_hist hist[3];
};

static inline uint64_t aiokvm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void aiokvm_cpu_relax(void)
{
    __builtin_ia32_pause();
}

/* While spinning: with spare cores, pause; with more busy threads than cores,
 * give the core to whoever we are waiting for. */
static inline void aiokvm_spin_relax(const struct aiokvm_hub *hub)
{
    if (hub->spin_yield)
        sched_yield();
    else
        __builtin_ia32_pause();
}

/* Move the slot from `from` to `to`; false if it was in another state.
 * Sequentially consistent, so that a move followed by a load of the other
 * side's flag (post, then hub->polling; DONE, then v->waiting) cannot be
 * reordered: a locked cmpxchg on x86, no extra fence. */
static inline int aiokvm_slot_move(uint32_t *slot, uint32_t from, uint32_t to)
{
    return __atomic_compare_exchange_n(slot, &from, to, 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE);
}

static inline long aiokvm_futex(uint32_t *addr, int op, uint32_t val)
{
    return syscall(SYS_futex, addr, op, val, NULL, NULL, 0);
}

/* hdrhistogram's counts index for v (HdrHistogram._counts_index_for). */
static inline uint64_t aiokvm_hist_index(const struct aiokvm_hist *h, uint64_t v)
{
    if ((v | h->sub_mask) == 0)
        return 0; /* an unbound histogram (clz of 0 is undefined) */
    uint32_t bucket = 64 - __builtin_clzll(v | h->sub_mask) - h->unit_mag - (h->half_mag + 1);
    uint64_t sub = v >> (bucket + h->unit_mag);
    return ((uint64_t)(bucket + 1) << h->half_mag) + sub - h->half_count;
}

static inline void aiokvm_hist_record(struct aiokvm_hist *h, uint64_t v)
{
    if (h->counts == NULL)
        return;
    uint64_t i = aiokvm_hist_index(h, v);
    if (i >= h->len) {
        i = h->len - 1;
        h->clamped++;
    }
    h->counts[i]++;
    h->total++;
    h->sum += v;
    if (v > h->max)
        h->max = v;
}

static inline uint64_t aiokvm_span(uint64_t from, uint64_t to)
{
    return to > from ? to - from : 0;
}

static void aiokvm_record_sample(struct aiokvm_vcpu *v, uint64_t t_entry)
{
    if (++v->sample_tick < v->sample_every)
        return;
    v->sample_tick = 0;
    aiokvm_hist_record(&v->hist[AIOKVM_LAT_EXIT_TO_START], aiokvm_span(v->t_exit, v->t_start));
    aiokvm_hist_record(&v->hist[AIOKVM_LAT_HANDLER], aiokvm_span(v->t_start, v->t_end));
    aiokvm_hist_record(&v->hist[AIOKVM_LAT_END_TO_ENTRY], aiokvm_span(v->t_end, t_entry));
}

/* Find the region claiming [addr, addr+len). */
static inline const struct aiokvm_mmio_region *aiokvm_find_mmio(const struct aiokvm_vcpu *v, uint64_t addr,
                                                                 uint32_t len)
{
    for (uint32_t i = 0; i < v->n_mmio; i++) {
        const struct aiokvm_mmio_region *r = &v->mmio[i];
        if (addr >= r->base && addr + len <= r->end)
            return r;
    }
    return NULL;
}

/* Post the current access to the loop and wait for it to complete.
 * Returns 0 when done, AIOKVM_RC_CANCELLED when the machine stops; *t_done
 * is when the wait ended (the caller's next timestamp, read once). */
static int aiokvm_post_and_wait(struct aiokvm_vcpu *v, uint64_t *t_done_out)
{
    struct aiokvm_hub *hub = v->hub;
    uint64_t t0 = v->t_exit;
    uint32_t s;

    if (!aiokvm_slot_move(&v->slot, AIOKVM_SLOT_EMPTY, AIOKVM_SLOT_POSTED)) {
        *t_done_out = aiokvm_now_ns(); /* cancelled before it was posted */
        return AIOKVM_RC_CANCELLED;
    }
    v->to_loop++;
    if (v->mech == AIOKVM_MECH_FUTEX || !__atomic_load_n(&hub->polling, __ATOMIC_SEQ_CST)) {
        uint64_t one = 1;
        if (write(hub->wake_fd, &one, sizeof(one)) == sizeof(one))
            v->wakeups_sent++;
    }
    uint64_t t_sleep = 0; /* 0: completed while spinning */
    if (v->mech == AIOKVM_MECH_SPIN) {
        uint64_t deadline = t0 + v->spin_ns;
        unsigned n = 0;
        for (;;) {
            s = __atomic_load_n(&v->slot, __ATOMIC_ACQUIRE);
            if (s == AIOKVM_SLOT_DONE || s == AIOKVM_SLOT_CANCELLED) {
                v->spin_hits++;
                goto done;
            }
            if ((++n & 63) == 0 && aiokvm_now_ns() >= deadline)
                break;
            aiokvm_spin_relax(hub);
        }
    }
    t_sleep = aiokvm_now_ns();
    for (;;) {
        __atomic_store_n(&v->waiting, 1, __ATOMIC_SEQ_CST);
        s = __atomic_load_n(&v->slot, __ATOMIC_SEQ_CST);
        if (s == AIOKVM_SLOT_DONE || s == AIOKVM_SLOT_CANCELLED)
            break;
        v->futex_waits++;
        aiokvm_futex(&v->slot, FUTEX_WAIT_PRIVATE, s);
    }
    __atomic_store_n(&v->waiting, 0, __ATOMIC_RELAXED);
done:;
    uint64_t t_done = aiokvm_now_ns();
    *t_done_out = t_done;
    if (t_sleep == 0)
        t_sleep = t_done;
    v->spin_wait_ns += t_sleep - t0;
    v->sleep_wait_ns += t_done - t_sleep;
    v->wait_ns += t_done - t0;
    if (s == AIOKVM_SLOT_CANCELLED)
        return AIOKVM_RC_CANCELLED;
    /* No other thread moves a DONE slot (a cancel only takes POSTED or
     * TAKEN), so this one needs no compare-and-swap. */
    __atomic_store_n(&v->slot, AIOKVM_SLOT_EMPTY, __ATOMIC_RELAXED);
    return 0;
}

/* Describe the current I/O exit in v->kind/addr/size/count/simple/value. */
static inline void aiokvm_describe_io(struct aiokvm_vcpu *v, struct kvm_run *run)
{
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    v->kind = run->io.direction == KVM_EXIT_IO_OUT ? AIOKVM_IO_OUT : AIOKVM_IO_IN;
    v->addr = run->io.port;
    v->size = run->io.size;
    v->count = run->io.count;
    v->simple = run->io.count == 1;
    v->value = 0;
    if (v->simple && v->kind == AIOKVM_IO_OUT)
        memcpy(&v->value, data, run->io.size);
}

static inline void aiokvm_describe_mmio(struct aiokvm_vcpu *v, struct kvm_run *run)
{
    uint32_t len = run->mmio.len > 8 ? 8 : run->mmio.len;
    v->kind = run->mmio.is_write ? AIOKVM_MMIO_WRITE : AIOKVM_MMIO_READ;
    v->addr = run->mmio.phys_addr;
    v->size = len;
    v->count = 1;
    v->simple = 1;
    v->value = 0;
    if (run->mmio.is_write)
        memcpy(&v->value, run->mmio.data, len);
}

/* Write a single read result (the low `size` bytes of value) into kvm_run. */
static inline void aiokvm_store_read(struct aiokvm_vcpu *v, uint64_t value)
{
    struct kvm_run *run = v->run;
    if (v->kind == AIOKVM_IO_IN)
        memcpy((uint8_t *)run + run->io.data_offset, &value, v->size);
    else if (v->kind == AIOKVM_MMIO_READ)
        memcpy(run->mmio.data, &value, v->size);
}

/* Run the vCPU until something needs Python.  After a one-element read was
 * returned to Python, aiokvm_vcpu_run_read() answers it instead (two entry
 * points, so that the common case is a one-argument call). */
static int64_t aiokvm_vcpu_run(struct aiokvm_vcpu *v)
{
    struct kvm_run *run = v->run;
    uint64_t t_entry = aiokvm_now_ns();

    if (v->t_return)
        v->python_ns += t_entry - v->t_return;
    if (v->pending_in) {
        /* A read left unanswered (cannot happen from cpu/vcpu_thread.py): all ones,
         * like an unclaimed port, rather than stale bytes. */
        aiokvm_store_read(v, ~0ull);
        v->pending_in = 0;
    }
    if (v->t_exit) {
        /* The previous exit went to an inline handler: its handler time is
         * the time spent in Python. */
        v->t_start = v->t_return;
        v->t_end = t_entry;
        aiokvm_record_sample(v, t_entry);
        v->t_exit = 0;
    }
    for (;;) {
        if (__atomic_load_n(&v->stop, __ATOMIC_ACQUIRE)) {
            v->t_return = aiokvm_now_ns();
            return AIOKVM_RC_INTR;
        }
        int rc = ioctl(v->fd, KVM_RUN, 0);
        uint64_t now = aiokvm_now_ns();
        v->kvm_run_ns += now - t_entry;
        if (rc < 0) {
            int err = errno;
            v->t_return = now;
            if (err == EINTR || err == EAGAIN) {
                v->intr_exits++;
                run->immediate_exit = 0;
                return AIOKVM_RC_INTR;
            }
            return -err;
        }
        v->exits++;
        v->t_exit = now;
        uint32_t entry;
        if (run->exit_reason == KVM_EXIT_IO) {
            uint32_t port = run->io.port;
            v->io_exits++;
            v->pio_counts[port * 2 + (run->io.direction == KVM_EXIT_IO_OUT)]++;
            if (run->io.count > 1)
                v->string_io_elements += run->io.count;
            entry = v->pio_table[port];
            if (port + run->io.size > 0x10000 ||
                (run->io.size > 1 && v->pio_table[port + run->io.size - 1] != entry))
                entry = AIOKVM_UNCLAIMED; /* straddles a region end */
            if ((entry & 3) == AIOKVM_UNCLAIMED) {
                if (run->io.direction == KVM_EXIT_IO_OUT) {
                    v->unclaimed_pio_writes += run->io.count;
                } else {
                    memset((uint8_t *)run + run->io.data_offset, 0xff, run->io.size * run->io.count);
                    v->unclaimed_pio_reads += run->io.count;
                }
                v->t_exit = 0;
                t_entry = now; /* tens of ns of bookkeeping count as KVM_RUN time */
                continue;
            }
            aiokvm_describe_io(v, run);
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            uint32_t len = run->mmio.len > 8 ? 8 : run->mmio.len;
            const struct aiokvm_mmio_region *r = aiokvm_find_mmio(v, run->mmio.phys_addr, len);
            v->mmio_exits++;
            if (r == NULL) {
                if (run->mmio.is_write) {
                    v->unclaimed_mmio_writes++;
                } else {
                    memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
                    v->unclaimed_mmio_reads++;
                }
                v->t_exit = 0;
                t_entry = now; /* tens of ns of bookkeeping count as KVM_RUN time */
                continue;
            }
            entry = r->id << 2 | r->mode;
            aiokvm_describe_mmio(v, run);
        } else {
            v->other_exits++;
            v->t_exit = 0;
            v->t_return = aiokvm_now_ns();
            return AIOKVM_RC_OTHER;
        }
        v->region = entry >> 2;
        if (v->region >= AIOKVM_MAX_REGIONS)
            v->region = 0; /* cannot happen: ids are checked when tables are built */
        v->region_hits[v->region]++;
        {
            uint64_t op = !v->simple ? AIOKVM_OP_STRING
                          : (v->kind == AIOKVM_IO_OUT || v->kind == AIOKVM_MMIO_WRITE) ? AIOKVM_OP_WRITE
                                                                                       : AIOKVM_OP_READ;
            uint64_t offset = (v->addr - v->region_base[v->region]) & ((1ull << AIOKVM_PACK_OFFSET_BITS) - 1);
            v->packed = (int64_t)(AIOKVM_RC_PYTHON | op << AIOKVM_PACK_OP_SHIFT |
                                  (uint64_t)v->size << AIOKVM_PACK_SIZE_SHIFT |
                                  (uint64_t)v->region << AIOKVM_PACK_REGION_SHIFT | offset << AIOKVM_PACK_OFFSET_SHIFT);
        }
        if ((entry & 3) == AIOKVM_LOOP && v->mech != AIOKVM_MECH_PYTHON) {
            int r = aiokvm_post_and_wait(v, &t_entry);
            if (r) {
                v->t_exit = 0;
                v->t_return = t_entry;
                return r;
            }
            aiokvm_record_sample(v, t_entry);
            v->t_exit = 0;
            continue;
        }
        /* Inline (or Python-level handoff): back to Python. */
        v->to_python++;
        v->pending_in = v->simple && (v->kind == AIOKVM_IO_IN || v->kind == AIOKVM_MMIO_READ);
        v->t_return = aiokvm_now_ns();
        return v->packed;
    }
}

/* Answer the one-element read the last run returned with value, and run on. */
static int64_t aiokvm_vcpu_run_read(struct aiokvm_vcpu *v, uint64_t value)
{
    if (v->pending_in) {
        aiokvm_store_read(v, value);
        v->pending_in = 0;
    }
    return aiokvm_vcpu_run(v);
}

/* ---- the loop side ---------------------------------------------------------- */

/* Bitmask of vCPUs whose slot holds a posted access. */
static uint64_t aiokvm_hub_poll(struct aiokvm_hub *hub)
{
    uint64_t mask = 0;
    for (uint32_t i = 0; i < hub->nvcpus; i++) {
        struct aiokvm_vcpu *v = hub->vcpus[i];
        if (v && __atomic_load_n(&v->slot, __ATOMIC_ACQUIRE) == AIOKVM_SLOT_POSTED)
            mask |= 1ull << i;
    }
    return mask;
}

/* Set the polling flag; when clearing it, return the slots posted meanwhile
 * (the caller must not sleep if that is non-zero). */
static uint64_t aiokvm_hub_set_polling(struct aiokvm_hub *hub, uint32_t on)
{
    __atomic_store_n(&hub->polling, on, __ATOMIC_SEQ_CST);
    return on ? 0 : aiokvm_hub_poll(hub);
}

static void aiokvm_wake_vcpu(struct aiokvm_vcpu *v)
{
    if (__atomic_load_n(&v->waiting, __ATOMIC_SEQ_CST))
        aiokvm_futex(&v->slot, FUTEX_WAKE_PRIVATE, 1);
}

/* Complete a taken access (loop thread): store a single read result (when
 * the access is simple) and release the vCPU.  Returns 0 if the access was
 * cancelled meanwhile: then nobody is released, and a result written in the
 * window between the look and the swap lands in a kvm_run that its vCPU,
 * having seen CANCELLED, never reads again (its thread ends). */
static int aiokvm_complete(struct aiokvm_vcpu *v, uint64_t value)
{
    if (__atomic_load_n(&v->slot, __ATOMIC_ACQUIRE) != AIOKVM_SLOT_TAKEN)
        return 0;
    if (v->simple)
        aiokvm_store_read(v, value);
    v->t_end = aiokvm_now_ns();
    if (!aiokvm_slot_move(&v->slot, AIOKVM_SLOT_TAKEN, AIOKVM_SLOT_DONE))
        return 0;
    aiokvm_wake_vcpu(v);
    return 1;
}

/* Let go of the access the loop holds without completing it: the vCPU keeps
 * waiting until aiokvm_complete_held(v, value) (a device that finishes the
 * access later, e.g. a reset that waits for I/O in flight).  Returns the
 * held vCPU's index, or -1. */
static int32_t aiokvm_hub_detach(struct aiokvm_hub *hub)
{
    int32_t current = hub->current;
    hub->current = -1;
    return current;
}

static int aiokvm_complete_held(struct aiokvm_vcpu *v, uint64_t value)
{
    return aiokvm_complete(v, value);
}

/* Complete the access the loop holds (if any) with result, then spin (up to
 * hub->spin_ns; cffi releases the GIL) for the next posted access and claim
 * it.  Returns its packed word (always > 0; hub->current and hub->value say
 * whose it is and what it writes), or -1 after spin_ns without one.  The
 * loop side makes one such call per loop-hosted exit. */
static int64_t aiokvm_hub_serve(struct aiokvm_hub *hub, uint64_t result)
{
    if (hub->current >= 0) {
        aiokvm_complete(hub->vcpus[hub->current], result);
        hub->current = -1;
    }
    uint64_t deadline = 0;
    unsigned n = 0;
    uint32_t start = hub->next_scan;
    for (;;) {
        /* Round-robin from where the last scan stopped: no vCPU starves. */
        for (uint32_t k = 0; k < hub->nvcpus; k++) {
            uint32_t i = (start + k) % hub->nvcpus;
            struct aiokvm_vcpu *v = hub->vcpus[i];
            if (v && __atomic_load_n(&v->slot, __ATOMIC_RELAXED) == AIOKVM_SLOT_POSTED &&
                aiokvm_slot_move(&v->slot, AIOKVM_SLOT_POSTED, AIOKVM_SLOT_TAKEN)) {
                v->t_start = aiokvm_now_ns();
                hub->next_scan = i + 1;
                hub->current = (int32_t)i;
                hub->value = v->value;
                return v->packed;
            }
        }
        if ((n++ & 31) == 0) {
            uint64_t now = aiokvm_now_ns();
            if (!deadline)
                deadline = now + hub->spin_ns;
            else if (now >= deadline)
                return -1;
        }
        aiokvm_spin_relax(hub);
    }
}

/* Complete the held access (if any) with result, without claiming another. */
static void aiokvm_hub_finish(struct aiokvm_hub *hub, uint64_t result)
{
    if (hub->current >= 0) {
        aiokvm_complete(hub->vcpus[hub->current], result);
        hub->current = -1;
    }
}

/* The machine is stopping: cancel the access in flight, or the next post.
 * An EMPTY slot is cancelled too, so a vCPU about to post fails its post
 * instead of waiting on a loop that may never serve it again.  A DONE slot
 * is left alone: its vCPU empties it and then sees `stop`. */
static void aiokvm_cancel(struct aiokvm_vcpu *v)
{
    __atomic_store_n(&v->stop, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        uint32_t s = __atomic_load_n(&v->slot, __ATOMIC_ACQUIRE);
        if (s != AIOKVM_SLOT_EMPTY && s != AIOKVM_SLOT_POSTED && s != AIOKVM_SLOT_TAKEN)
            break;
        if (aiokvm_slot_move(&v->slot, s, AIOKVM_SLOT_CANCELLED))
            break;
    }
    aiokvm_futex(&v->slot, FUTEX_WAKE_PRIVATE, 1);
}

/* Drain KVM's coalesced MMIO/PIO ring into out[] (loop thread only). */
static uint32_t aiokvm_coalesced_drain(struct kvm_coalesced_mmio_ring *ring, uint32_t capacity,
                                       struct kvm_coalesced_mmio *out, uint32_t max)
{
    uint32_t n = 0;
    while (n < max) {
        uint32_t first = ring->first;
        if (first == __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE))
            break;
        if (first >= capacity)
            break; /* never trust a shared index blindly */
        out[n++] = ring->coalesced_mmio[first];
        __atomic_store_n(&ring->first, (first + 1) % capacity, __ATOMIC_RELEASE);
    }
    return n;
}

/* The non-zero entries of counts[0..len): their indexes in keys[], counts in
 * values[] (per-port exit counts, histogram buckets). */
static uint32_t aiokvm_nonzero(const uint64_t *counts, uint32_t len, uint32_t *keys, uint64_t *values, uint32_t max)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < len && n < max; i++) {
        if (counts[i]) {
            keys[n] = i;
            values[n] = counts[i];
            n++;
        }
    }
    return n;
}

#endif
