"""Other kernels: a qemu runner that works on this machine (``python -m vagrant.run_kernels``)
and a Vagrantfile for users with hardware virtualisation."""
