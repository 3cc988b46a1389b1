"""CPU backends: each produces one normalized stream of exits (``exits.py``).

``vcpu_thread.VcpuThread`` is the KVM backend: one thread per vCPU running
the C run loop (``aiokvm/kvm/_vcpu_loop.h``), with kicks, pause and resume.
"""
