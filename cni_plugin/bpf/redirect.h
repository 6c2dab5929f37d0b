/* Contract constants and map layouts shared by redirect.c and its loader.
 *
 * Every value has a default here and is normally passed by the loader as -D from
 * cni_plugin/constants.py (tests/unit/test_bpf_header.py checks the defaults agree).
 * The struct layouts are mirrored with struct formats in cni_plugin/bpf/programs.py.
 */
#ifndef ISTIO_CNI_REDIRECT_H
#define ISTIO_CNI_REDIRECT_H

#ifndef ZTUNNEL_OUTBOUND_PORT
#define ZTUNNEL_OUTBOUND_PORT 15001
#endif
#ifndef ZTUNNEL_INBOUND_PORT
#define ZTUNNEL_INBOUND_PORT 15006
#endif
#ifndef ZTUNNEL_HBONE_PORT
#define ZTUNNEL_HBONE_PORT 15008
#endif
#ifndef ZTUNNEL_DNS_PORT
#define ZTUNNEL_DNS_PORT 15053
#endif
#ifndef DNS_PORT
#define DNS_PORT 53
#endif
#ifndef ZTUNNEL_MARK
#define ZTUNNEL_MARK 0x539
#endif
#ifndef CONNMARK
#define CONNMARK 0x111
#endif
#ifndef MARK_MASK
#define MARK_MASK 0xfff
#endif
#ifndef LOOPBACK_IFINDEX
#define LOOPBACK_IFINDEX 1
#endif

/* settings.flags */
#define F_DNS_CAPTURE 1
#define F_BYPASS_INBOUND 2
#define F_IPV6 4
#define F_INBOUND_NAT 8 /* inbound by port rewrite even where bpf_sk_assign would work */
#define F_DRAIN 16      /* leaving the mesh: steer no new connection, keep the captured ones */

/* One entry (key 0) per pod: what the programs do in this namespace. */
struct settings {
    __u32 flags;
    __u32 probe4;      /* network byte order */
    __u32 probe6[4];   /* network byte order */
    __u32 version;     /* first 4 bytes of the program image's key: says "ours, which build" */
    __u32 reserved;
};

/* Our own NAT (no conntrack). `nat` is keyed by a captured connection as ztunnel's socket
 * sees it: the client's address and the source port its packets carry after the rewrite,
 * mapping to the destination it asked for, the ztunnel port it was sent to and its own
 * source port. The replies get their source (and the client its port) back from it, and
 * ztunnel's SO_ORIGINAL_DST (answered by istio_getsockopt) reads it. Outbound always;
 * inbound only where bpf_sk_assign refuses ztunnel's SO_REUSEPORT listeners (Linux < 6.5).
 * One node-wide map: pod addresses are unique on a node. */
struct nat_key {
    __u32 addr[4];  /* the client */
    __u16 port;     /* its source port after the rewrite (network byte order) */
    __u8 family;
    __u8 proto;
    __u32 local[4]; /* inbound: the pod address it connected to; outbound: zero */
};

struct nat_val {
    __u32 addr[4];
    __u16 port;    /* network byte order */
    __u16 target;  /* ztunnel port, host byte order */
    __u16 sport;   /* the client's own source port (network byte order) */
    __u16 pad;
    __u64 created; /* bpf_ktime_get_ns() when recorded: a young entry claims its port */
};

/* A captured outbound (or virtual-interface) TCP connection by its original 5-tuple: the
 * source port it was given. Linux reuses a client port for different destinations, and
 * both would become the same 4-tuple towards ztunnel's port (issue 19); the second then
 * gets a free port instead of its own. */
struct nat_tuple {
    __u32 src[4];
    __u32 dst[4];
    __u16 sport; /* network byte order */
    __u16 dport;
    __u8 family;
    __u8 proto;
    __u16 pad;
};

struct nat_fwd_val {
    __u16 port;   /* the source port after the rewrite (network byte order) */
    __u16 target; /* ztunnel port, host byte order */
};

/* Source ports tried for a captured connection whose own port's tuple towards ztunnel is
 * taken (Linux's default ephemeral range), how many, and how long a fresh `nat` entry
 * claims its port before a socket exists for it (the SYN on its way to the listener). */
#define NAT_PORT_MIN 32768
#define NAT_PORT_COUNT 28232
#define NAT_PORT_TRIES 8
#define NAT_CLAIM_NS 1000000000ULL

/* A pod's virtual interface (istio.io/reroute-virtual-interfaces), keyed by ifindex in
 * the pod's own `virt` map: the address iptables' REDIRECT would pick on it (its first
 * IPv4 address and first global IPv6 address, zero when it has none). */
struct virt_addr {
    __u32 addr4;    /* network byte order */
    __u32 addr6[4]; /* network byte order */
};
#define MAX_VIRTUAL_IFACES 8

/* counters (array index) */
#define C_OUTBOUND 0       /* outbound SYN sent to 15001 */
#define C_INBOUND 1        /* inbound SYN handed to the 15006 listener */
#define C_DNS_TCP 2        /* TCP/53 SYN sent to 15053 */
#define C_DNS_UDP 3        /* UDP/53 query sent to 15053 */
#define C_REPLY 4          /* reply from 15001/15053 given back its original source */
#define C_NO_LISTENER 5    /* inbound SYN dropped: no 15006 listener (yet) */
#define C_LOCAL_REDIRECT 6 /* packet of a local conversation turned back to lo */
#define C_VIRTUAL 7        /* SYN from a virtual interface sent to 15001 */
#define C_PORT_REMAP 8     /* captured SYN given another source port: its own was taken */
#define C_NO_PORT 9        /* captured SYN dropped: no free source port found (retried) */
#define C_COUNT 10

#endif
