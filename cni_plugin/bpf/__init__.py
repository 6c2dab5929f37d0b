"""The eBPF redirection backend: C programs (``redirect.c``) compiled by bcc, loaded and
attached per pod through the bpf syscall and netlink. See ``README.md`` beside this file."""
