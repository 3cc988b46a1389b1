/* Small C helpers for the aiokvm cffi binding.
 *
 * cffi calls these with the GIL released.  Every helper returns -errno on
 * failure so Python never has to read errno after the fact (another thread
 * could have clobbered it between the call and the read).
 */
#ifndef AIOKVM_HELPERS_H
#define AIOKVM_HELPERS_H

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

static int aiokvm_ioctl(int fd, unsigned long request, void *arg)
{
    int rc = ioctl(fd, request, arg);
    return rc < 0 ? -errno : rc;
}

static long aiokvm_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    long rc = ioctl(fd, request, arg);
    return rc < 0 ? -errno : rc;
}

/* One KVM_RUN.  Unlike CPython's fcntl.ioctl this does not retry on EINTR:
 * a kick (immediate_exit + signal) must reach the caller. */
static int aiokvm_run(int vcpu_fd)
{
    int rc = ioctl(vcpu_fd, KVM_RUN, 0);
    return rc < 0 ? -errno : rc;
}

static void aiokvm_noop_signal(int signo)
{
    (void)signo;
}

/* Install a no-op handler for the kick signal, unless the application
 * already handles it (any handler interrupts KVM_RUN equally well).
 * SIG_DFL would kill the process and SIG_IGN would not interrupt KVM_RUN,
 * so both are replaced.  Returns 1 if installed, 0 if left alone. */
static int aiokvm_install_kick_handler(int signo)
{
    struct sigaction old, sa;
    if (sigaction(signo, NULL, &old) < 0)
        return -errno;
    if (!(old.sa_flags & SA_SIGINFO) &&
        old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN)
        return 0;
    if ((old.sa_flags & SA_SIGINFO) && old.sa_sigaction != NULL)
        return 0;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = aiokvm_noop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: the point is to interrupt */
    if (sigaction(signo, &sa, NULL) < 0)
        return -errno;
    return 1;
}

#endif
