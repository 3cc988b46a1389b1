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

static void aiokvm_noop_signal(int signo)
{
    (void)signo;
}

/* Install the no-op handler for the vCPU kick signal.  Returns 1 if it was
 * installed now, 0 if it already was, -EBUSY if the application handles the
 * signal itself (its handler would run on every kick, so aiokvm refuses to
 * share it), or -errno.  SIG_DFL is replaced (it would kill the process on an
 * RT signal); SIG_IGN too (an ignored signal does not interrupt KVM_RUN). */
static int aiokvm_install_kick_handler(int signo)
{
    struct sigaction old, sa;
    if (sigaction(signo, NULL, &old) < 0)
        return -errno;
    if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler == aiokvm_noop_signal)
        return 0;
    if ((old.sa_flags & SA_SIGINFO) ? old.sa_sigaction != NULL
                                    : (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN))
        return -EBUSY;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = aiokvm_noop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: the point is to interrupt */
    if (sigaction(signo, &sa, NULL) < 0)
        return -errno;
    return 1;
}

#endif
