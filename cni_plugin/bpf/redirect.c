/* In-pod redirection for Istio ambient (SPEC section 6) without conntrack.
 *
 * istio_egress     - tc egress of every pod interface but lo.
 * istio_ingress    - tc ingress of lo and of every pod interface.
 * istio_virt_ingress - tc ingress of a pod's virtual interfaces (loaded per pod).
 * istio_getsockopt - cgroup getsockopt (node-wide): SO_ORIGINAL_DST from our NAT map.
 *
 * Inbound TCP is delivered transparently: the SYN is handed to ztunnel's 15006 listener
 * with bpf_sk_assign, so the accepted socket's local address is the original destination
 * (ztunnel's fallback when SO_ORIGINAL_DST fails). Outbound TCP (to 15001, TCP/53 to
 * 15053) and UDP/53 (to 15053) cannot be delivered that way to ztunnel's ordinary
 * listeners (a reply from a non-local source address needs IP_TRANSPARENT), so they get a
 * small NAT of our own: istio_egress rewrites the destination to 127.0.0.1/::1:<port>
 * and turns the packet back into lo's receive path, recording the original destination in
 * the node-wide `nat` map; istio_ingress on lo gives the replies their original source back;
 * istio_getsockopt answers ztunnel's SO_ORIGINAL_DST from the same map. Two connections
 * from one client port to two destinations would become one 4-tuple at ztunnel's port, so
 * a TCP connection whose tuple there is taken gets a free source port (`nat_fwd` keeps the
 * port each original 5-tuple was given; `nat` is keyed by the rewritten one). Replies to
 * ztunnel's spoofed-source inbound connections are recognised by the kernel's own socket
 * table (a local non-listening socket owns the reversed 4-tuple) and turned back into lo
 * marked 0x111, which the policy route (fwmark 0x111 -> table 100 -> local) delivers.
 *
 * Virtual interfaces (istio.io/reroute-virtual-interfaces: a VM inside the pod) carry the
 * VM's outbound traffic in: as Istio's `-i IF -p tcp -j REDIRECT --to-ports 15001` rule,
 * istio_virt_ingress sends their TCP to the interface's own address, port 15001 (recorded
 * in `nat`), and istio_egress gives ztunnel's replies their original source back as they
 * leave on that interface. Nothing else happens to what arrives there (Istio's RETURN).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#include "redirect.h"

#define TH_SYN 0x02
#define TH_ACK 0x10
#define IP4_CSUM_OFF (ETH_HLEN + 10)
#define IP4_SRC_OFF (ETH_HLEN + 12)
#define IP4_DST_OFF (ETH_HLEN + 16)
#define IP6_SRC_OFF (ETH_HLEN + 8)
#define IP6_DST_OFF (ETH_HLEN + 24)
#define UDP_CSUM_OFF 6
#define TCP_CSUM_OFF 16
#define SO_ORIGINAL_DST 80
#define SOL_IP_LEVEL 0
#define SOL_IPV6_LEVEL 41
/* Keeps clang from reusing a computed &skb->field across calls (the verifier refuses a
 * dereference of a modified context pointer). */
#define CTX_FRESH(p) asm volatile("" : "+r"(p))

BPF_ARRAY(cfg, struct settings, 1);
BPF_TABLE("lru_hash", struct nat_key, struct nat_val, nat, 65536);
BPF_TABLE("lru_hash", struct nat_tuple, struct nat_fwd_val, nat_fwd, 65536);
BPF_ARRAY(counters, u64, C_COUNT);
/* Per pod (only pods with virtual interfaces load istio_virt_ingress): ifindex -> address. */
BPF_HASH(virt, __u32, struct virt_addr, MAX_VIRTUAL_IFACES);

struct flow {
    __u32 src[4];
    __u32 dst[4];
    __u16 sport; /* network byte order */
    __u16 dport;
    __u32 l4;    /* offset of the TCP/UDP header */
    __u8 family; /* 4 or 6 */
    __u8 proto;
    __u8 tcp_flags;
    __u8 pad;
};

static __always_inline void count(int idx)
{
    u64 *v = counters.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

/* 0 when the packet is TCP or UDP over IPv4 (or IPv6 when enabled) with ports readable. */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f, __u32 flags)
{
    if (skb->protocol == htons(ETH_P_IP)) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
            return -1;
        if (ip.ihl < 5 || (ip.frag_off & htons(0x1fff)))
            return -1; /* non-first fragments carry no ports */
        f->family = 4;
        f->proto = ip.protocol;
        f->src[0] = ip.saddr;
        f->dst[0] = ip.daddr;
        f->l4 = ETH_HLEN + ip.ihl * 4;
    } else if (skb->protocol == htons(ETH_P_IPV6) && (flags & F_IPV6)) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
            return -1;
        f->family = 6;
        f->proto = ip6.nexthdr; /* extension headers: not steered (documented) */
        __builtin_memcpy(f->src, &ip6.saddr, 16);
        __builtin_memcpy(f->dst, &ip6.daddr, 16);
        f->l4 = ETH_HLEN + sizeof(ip6);
    } else {
        return -1;
    }
    if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
        return -1;
    __u16 ports[2];
    if (bpf_skb_load_bytes(skb, f->l4, ports, sizeof(ports)))
        return -1;
    f->sport = ports[0];
    f->dport = ports[1];
    if (f->proto == IPPROTO_TCP) {
        __u8 fl;
        if (bpf_skb_load_bytes(skb, f->l4 + 13, &fl, 1))
            return -1;
        f->tcp_flags = fl;
    }
    return 0;
}

static __always_inline int same_addr(__u8 family, const __u32 *a, const __u32 *b)
{
    if (family == 4)
        return a[0] == b[0];
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* 127.0.0.1/32 or ::1/128, exactly as the iptables rules exempt it. */
static __always_inline int is_loopback(__u8 family, const __u32 *a)
{
    if (family == 4)
        return a[0] == htonl(0x7f000001);
    return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == htonl(1);
}

static __always_inline int is_probe(struct settings *s, __u8 family, const __u32 *a)
{
    if (family == 4)
        return a[0] == s->probe4;
    return same_addr(6, a, s->probe6);
}

/* The kernel's TCP socket lookup for a packet from ra:rp to la:lp (established first,
 * then listeners). The caller releases the result. */
static __always_inline struct bpf_sock *lookup(struct __sk_buff *skb, __u8 family,
                                               const __u32 *ra, __u16 rp,
                                               const __u32 *la, __u16 lp)
{
    struct bpf_sock_tuple t = {};
    if (family == 4) {
        t.ipv4.saddr = ra[0];
        t.ipv4.daddr = la[0];
        t.ipv4.sport = rp;
        t.ipv4.dport = lp;
        return bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    }
    __builtin_memcpy(t.ipv6.saddr, ra, 16);
    __builtin_memcpy(t.ipv6.daddr, la, 16);
    t.ipv6.sport = rp;
    t.ipv6.dport = lp;
    return bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
}

/* 1 when a local socket other than a listener owns the conversation of a packet from
 * ra:rp to la:lp, i.e. the packet belongs to this namespace. */
static __always_inline int owned_locally(struct __sk_buff *skb, __u8 family,
                                         const __u32 *ra, __u16 rp,
                                         const __u32 *la, __u16 lp)
{
    struct bpf_sock *sk = lookup(skb, family, ra, rp, la, lp);
    if (!sk)
        return 0;
    int listening = sk->state == BPF_TCP_LISTEN;
    bpf_sk_release(sk);
    return !listening;
}

/* Hand a SYN to the listener on `port`, keeping the packet's destination (transparent);
 * with `check_only`, just confirm the listener exists. 0, -1 when there is no listener,
 * or the helper's error. */
static __always_inline int assign(struct __sk_buff *skb, struct flow *f, __u16 port,
                                  int check_only)
{
    struct bpf_sock *sk = lookup(skb, f->family, f->src, f->sport, f->dst, htons(port));
    if (sk && sk->state != BPF_TCP_LISTEN) {
        /* The client's tuple at `port` is taken (inbound by port rewrite: a connection from
         * this client port to another port of the pod): the listener is what counts. */
        bpf_sk_release(sk);
        sk = lookup(skb, f->family, f->src, 0, f->dst, htons(port));
    }
    if (!sk)
        return -1;
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return -1;
    }
    long err = check_only ? 0 : bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    return (int)err;
}

/* Turn an outgoing packet back into this namespace: lo's receive path, marked so the
 * policy route (fwmark 0x111 -> table 100: local) delivers it whatever its destination. */
static __always_inline int to_lo(struct __sk_buff *skb)
{
    __u8 zero[ETH_ALEN] = {};
    /* lo's address is all zeroes: any other destination MAC reads as PACKET_OTHERHOST. */
    if (bpf_skb_store_bytes(skb, 0, zero, ETH_ALEN, 0))
        return TC_ACT_SHOT;
    CTX_FRESH(skb);
    __u32 mark = skb->mark;
    CTX_FRESH(skb);
    skb->mark = (mark & ~MARK_MASK) | CONNMARK;
    return bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

static __always_inline __u32 csum_off(struct flow *f)
{
    return f->l4 + (f->proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
}

static __always_inline __u64 csum_flags(struct flow *f)
{
    /* a zero UDP checksum means "none" and must stay zero; TCP's zero is a value */
    return f->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

static __always_inline int set_addr(struct __sk_buff *skb, struct flow *f, int dst,
                                    const __u32 *from, const __u32 *to)
{
    if (f->family == 4) {
        __u32 old = from[0], new = to[0];
        if (bpf_l4_csum_replace(skb, csum_off(f), old, new,
                                BPF_F_PSEUDO_HDR | csum_flags(f) | sizeof(new)))
            return -1;
        if (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, old, new, sizeof(new)))
            return -1;
        return bpf_skb_store_bytes(skb, dst ? IP4_DST_OFF : IP4_SRC_OFF, &new, 4, 0) ? -1 : 0;
    }
    __u32 old6[4], new6[4];
    __builtin_memcpy(old6, from, 16);
    __builtin_memcpy(new6, to, 16);
    __s64 diff = bpf_csum_diff(old6, 16, new6, 16, 0);
    if (bpf_l4_csum_replace(skb, csum_off(f), 0, diff, BPF_F_PSEUDO_HDR | csum_flags(f)))
        return -1;
    return bpf_skb_store_bytes(skb, dst ? IP6_DST_OFF : IP6_SRC_OFF, new6, 16, 0) ? -1 : 0;
}

static __always_inline int set_port(struct __sk_buff *skb, struct flow *f, int dst,
                                    __u16 old, __u16 new)
{
    if (bpf_l4_csum_replace(skb, csum_off(f), old, new, csum_flags(f) | sizeof(new)))
        return -1;
    return bpf_skb_store_bytes(skb, f->l4 + (dst ? 2 : 0), &new, 2, 0) ? -1 : 0;
}

static __always_inline void nat_key_of(struct nat_key *k, __u8 family, __u8 proto,
                                       const __u32 *addr, __u16 port)
{
    __builtin_memcpy(k->addr, addr, 16);
    k->port = port;
    k->family = family;
    k->proto = proto;
}

static __always_inline void tuple_of(struct nat_tuple *t, struct flow *f)
{
    __builtin_memcpy(t->src, f->src, 16);
    __builtin_memcpy(t->dst, f->dst, 16);
    t->sport = f->sport;
    t->dport = f->dport;
    t->family = f->family;
    t->proto = f->proto;
}

/* The rewrite of a captured TCP conversation (its later packets, a retransmitted SYN): the
 * source port it was given and its target, as long as `nat` still holds that port for it
 * (ports are reused: the entry may belong to a newer conversation by now). 0 when not.
 * `inbound`: sent to 15006 by port rewrite, its `nat` entry carries the pod address. */
static __always_inline int captured(struct flow *f, struct nat_fwd_val *out, int inbound)
{
    struct nat_tuple t = {};
    tuple_of(&t, f);
    struct nat_fwd_val *fv = nat_fwd.lookup(&t);
    if (!fv)
        return 0;
    struct nat_fwd_val got = *fv;
    struct nat_key k = {};
    nat_key_of(&k, f->family, f->proto, f->src, got.port);
    if (inbound)
        __builtin_memcpy(k.local, f->dst, 16);
    struct nat_val *v = nat.lookup(&k);
    if (!v || v->sport != f->sport || v->port != f->dport || v->target != got.target ||
        !same_addr(f->family, v->addr, f->dst))
        return 0;
    *out = got;
    return 1;
}

/* Record a new conversation (a SYN, or a datagram) sent to to:target and choose the source
 * port its packets carry from now on: its own, unless the 4-tuple that makes at ztunnel's
 * port is taken (a socket there owns it: request, established or TIME_WAIT; or a fresh
 * `nat` entry claims it for a SYN still on its way), else the first free one of a few
 * random ports. A retransmitted SYN keeps the port it was given. 0 when none is free: the
 * SYN is dropped and the client's retransmission tries again. `inbound`: see captured(). */
static __always_inline __u16 nat_open(struct __sk_buff *skb, struct flow *f, const __u32 *to,
                                      __u16 target, int inbound)
{
    struct nat_val v = {};
    __builtin_memcpy(v.addr, f->dst, 16);
    v.port = f->dport;
    v.target = target;
    v.sport = f->sport;
    v.created = bpf_ktime_get_ns();
    struct nat_key k = {};
    nat_key_of(&k, f->family, f->proto, f->src, f->sport);
    if (inbound)
        __builtin_memcpy(k.local, f->dst, 16);
    if (f->proto != IPPROTO_TCP) {
        /* ztunnel's DNS socket is unconnected: each datagram is recorded anew. */
        nat.update(&k, &v);
        return f->sport;
    }
    struct nat_fwd_val fv = {};
    if (captured(f, &fv, inbound) && fv.target == target)
        return fv.port;
    fv.target = target;
    for (int i = 0; i < NAT_PORT_TRIES; i++) {
        __u16 port = f->sport;
        if (i)
            port = htons(NAT_PORT_MIN + bpf_get_prandom_u32() % NAT_PORT_COUNT);
        k.port = port;
        struct nat_val *held = nat.lookup(&k);
        if (held && (__s64)(v.created - held->created) < (__s64)NAT_CLAIM_NS)
            continue;
        if (owned_locally(skb, f->family, f->src, port, to, htons(target)))
            continue;
        /* An absent entry is claimed only if still absent (another CPU's SYN). */
        if (held ? nat.update(&k, &v) : nat.insert(&k, &v))
            continue;
        struct nat_tuple t = {};
        tuple_of(&t, f);
        fv.port = port;
        nat_fwd.update(&t, &fv);
        if (i)
            count(C_PORT_REMAP);
        return port;
    }
    count(C_NO_PORT);
    return 0;
}

/* Rewrite a packet's destination to to:target and its source port to the one its
 * conversation was given. -1 on failure. */
static __always_inline int redirect_to(struct __sk_buff *skb, struct flow *f, const __u32 *to,
                                       __u16 target, __u16 port)
{
    if (set_addr(skb, f, 1, f->dst, to) || set_port(skb, f, 1, f->dport, htons(target)))
        return -1;
    if (port != f->sport && set_port(skb, f, 0, f->sport, port))
        return -1;
    return 0;
}

/* Send an outgoing packet to loopback:target through lo: a new connection or datagram
 * (`port` 0: recorded, its source port chosen) or a later packet of a captured one (`port`:
 * the source port it was given). */
static __always_inline int to_ztunnel(struct __sk_buff *skb, struct flow *f, __u16 target,
                                      __u16 port)
{
    /* 127.0.0.1 / ::1, as iptables' REDIRECT picks for locally generated packets: ztunnel
     * may listen on loopback only (its DNS proxy does). */
    __u32 lo[4] = {}; /* element by element: an initialiser list would land in .rodata */
    if (f->family == 4) {
        lo[0] = htonl(0x7f000001);
    } else {
        lo[3] = htonl(1);
    }
    if (!port)
        port = nat_open(skb, f, lo, target, 0);
    if (!port || redirect_to(skb, f, lo, target, port))
        return TC_ACT_SHOT;
    return to_lo(skb);
}

/* A retransmitted SYN whose first transmission was not steered (no record of it): its
 * connection began just before the redirection was attached. Steering the retransmission
 * to ztunnel would cross its handshake with the server's answer to the first SYN, and the
 * client would be reset (issue 19): it goes where the first one went. */
static __always_inline int syn_predates_redirection(struct __sk_buff *skb, struct flow *f)
{
    struct bpf_sock *sk = skb->sk;
    if (!sk)
        return 0;
    sk = bpf_sk_fullsock(sk);
    if (!sk)
        return 0;
    struct bpf_tcp_sock *tp = bpf_tcp_sock(sk);
    if (!tp || !tp->total_retrans)
        return 0;
    struct nat_fwd_val fv = {};
    return !captured(f, &fv, 0);
}

/* A reply from 15001/15053 to a client we rewrote: give it the source the client asked
 * for, and the client its own port. 1 when rewritten, 0 when not ours, -1 when the rewrite
 * failed. */
static __always_inline int reply_source(struct __sk_buff *skb, struct flow *f)
{
    if (f->sport != htons(ZTUNNEL_OUTBOUND_PORT) && f->sport != htons(ZTUNNEL_DNS_PORT))
        return 0;
    struct nat_key k = {};
    nat_key_of(&k, f->family, f->proto, f->dst, f->dport);
    struct nat_val *found = nat.lookup(&k);
    if (!found || htons(found->target) != f->sport)
        return 0;
    struct nat_val v = *found;
    if (set_addr(skb, f, 0, f->src, v.addr) || set_port(skb, f, 0, f->sport, v.port))
        return -1;
    if (v.sport != f->dport && set_port(skb, f, 1, f->dport, v.sport))
        return -1;
    count(C_REPLY);
    return 1;
}

/* On lo: the replies to the pod's own (outbound, DNS) clients. */
static __always_inline int nat_reply(struct __sk_buff *skb, struct flow *f)
{
    return reply_source(skb, f) < 0 ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

/* Inbound by port rewrite (where bpf_sk_assign refuses SO_REUSEPORT listeners): the
 * destination address stays the pod's own, so no routing changes; the port becomes 15006,
 * and the client's port another one where its tuple at 15006 is taken (one remote port to
 * two ports of the pod). `record` for the SYN; later packets must match the recorded
 * conversation. */
static __always_inline int inbound_nat(struct __sk_buff *skb, struct flow *f, int record)
{
    __u16 port;
    if (record) {
        port = nat_open(skb, f, f->dst, ZTUNNEL_INBOUND_PORT, 1);
        if (!port)
            return TC_ACT_SHOT;
    } else {
        struct nat_fwd_val fv = {};
        if (!captured(f, &fv, 1) || fv.target != ZTUNNEL_INBOUND_PORT)
            return TC_ACT_UNSPEC;
        port = fv.port;
    }
    if (set_port(skb, f, 1, f->dport, htons(ZTUNNEL_INBOUND_PORT)))
        return TC_ACT_SHOT;
    if (port != f->sport && set_port(skb, f, 0, f->sport, port))
        return TC_ACT_SHOT;
    return TC_ACT_UNSPEC;
}

/* ztunnel's answer from 15006 on such a conversation leaves with the port it was sent to,
 * to the client's own port. */
static __always_inline void inbound_reply(struct __sk_buff *skb, struct flow *f)
{
    struct nat_key k = {};
    nat_key_of(&k, f->family, IPPROTO_TCP, f->dst, f->dport);
    __builtin_memcpy(k.local, f->src, 16);
    struct nat_val *found = nat.lookup(&k);
    if (!found || found->target != ZTUNNEL_INBOUND_PORT)
        return;
    __u16 port = found->port;
    __u16 sport = found->sport;
    set_port(skb, f, 0, f->sport, port);
    if (sport != f->dport)
        set_port(skb, f, 1, f->dport, sport);
    count(C_REPLY);
}

int istio_egress(struct __sk_buff *skb)
{
    int zero = 0;
    struct settings *s = cfg.lookup(&zero);
    if (!s || !s->version)
        return TC_ACT_UNSPEC;
    /* Forwarded, not made here: iptables' nat OUTPUT never sees it (a VM's UDP, say). */
    CTX_FRESH(skb);
    if (skb->ingress_ifindex)
        return TC_ACT_UNSPEC;
    struct flow f = {};
    if (parse(skb, &f, s->flags))
        return TC_ACT_UNSPEC;
    if (f.proto == IPPROTO_TCP && f.sport == htons(ZTUNNEL_INBOUND_PORT))
        inbound_reply(skb, &f); /* ztunnel's (marked) replies, before the mark test */
    /* ztunnel's answer from 15001 to a client behind a virtual interface: the client is
     * not local, so this is the only way out (outbound clients are answered on lo). */
    if (f.proto == IPPROTO_TCP && f.sport == htons(ZTUNNEL_OUTBOUND_PORT)) {
        int r = reply_source(skb, &f);
        if (r)
            return r < 0 ? TC_ACT_SHOT : TC_ACT_UNSPEC;
    }
    if ((skb->mark & MARK_MASK) == ZTUNNEL_MARK)
        return TC_ACT_UNSPEC; /* ztunnel's own traffic, its upstream DNS included */
    int dns = (s->flags & F_DNS_CAPTURE) && f.dport == htons(DNS_PORT);
    int draining = s->flags & F_DRAIN;
    if (f.proto == IPPROTO_UDP) {
        if (!dns || draining)
            return TC_ACT_UNSPEC;
        count(C_DNS_UDP);
        return to_ztunnel(skb, &f, ZTUNNEL_DNS_PORT, 0);
    }
    if (is_probe(s, f.family, f.dst) || is_loopback(f.family, f.dst))
        return TC_ACT_UNSPEC;
    /* Replies to ztunnel's spoofed-source connections: the peer socket lives here. */
    if (owned_locally(skb, f.family, f.src, f.sport, f.dst, f.dport)) {
        count(C_LOCAL_REDIRECT);
        return to_lo(skb);
    }
    if ((f.tcp_flags & (TH_SYN | TH_ACK)) == TH_SYN) {
        if (draining) {
            /* Leaving: new connections go where they were sent. A record left by an earlier
             * captured conversation with this 5-tuple must not catch this one's later
             * packets (a SYN being steered overwrites it; this one is not). */
            struct nat_tuple t = {};
            tuple_of(&t, &f);
            nat_fwd.delete(&t);
            return TC_ACT_UNSPEC;
        }
        if (syn_predates_redirection(skb, &f))
            return TC_ACT_UNSPEC;
        count(dns ? C_DNS_TCP : C_OUTBOUND);
        return to_ztunnel(skb, &f, dns ? ZTUNNEL_DNS_PORT : ZTUNNEL_OUTBOUND_PORT, 0);
    }
    struct nat_fwd_val fv = {};
    if (captured(&f, &fv, 0))
        return to_ztunnel(skb, &f, fv.target, fv.port);
    return TC_ACT_UNSPEC; /* a conversation that predates redirection stays as it was */
}

int istio_ingress(struct __sk_buff *skb)
{
    int zero = 0;
    struct settings *s = cfg.lookup(&zero);
    if (!s || !s->version)
        return TC_ACT_UNSPEC;
    struct flow f = {};
    if (parse(skb, &f, s->flags))
        return TC_ACT_UNSPEC;
    int on_lo = skb->ifindex == LOOPBACK_IFINDEX;
    if (on_lo) {
        int r = nat_reply(skb, &f);
        if (r != TC_ACT_UNSPEC)
            return r;
    }
    if (f.proto != IPPROTO_TCP)
        return TC_ACT_UNSPEC;
    if ((f.tcp_flags & (TH_SYN | TH_ACK)) != TH_SYN) {
        /* Only new connections are steered; the rest finds its socket, except the later
         * packets of an inbound conversation sent to 15006 by port rewrite. */
        return on_lo ? TC_ACT_UNSPEC : inbound_nat(skb, &f, 0);
    }
    __u32 mark = skb->mark & MARK_MASK;
    if (mark == ZTUNNEL_MARK || is_probe(s, f.family, f.src) || is_loopback(f.family, f.dst))
        return TC_ACT_UNSPEC;
    if (s->flags & F_DRAIN)
        return TC_ACT_UNSPEC; /* leaving: new connections reach the app directly */
    if (on_lo) {
        /* Connections made inside the pod: iptables decides them once, in nat OUTPUT, where
         * only TCP/53 is redirected before `! -d 127.0.0.1 -o lo -j ACCEPT`; its PREROUTING
         * rules never see them. Those sent here by istio_egress carry CONNMARK and are
         * already addressed to ztunnel. */
        if (mark != CONNMARK && (s->flags & F_DNS_CAPTURE) && f.dport == htons(DNS_PORT)) {
            count(C_DNS_TCP);
            return to_ztunnel(skb, &f, ZTUNNEL_DNS_PORT, 0);
        }
        return TC_ACT_UNSPEC;
    }
    if ((s->flags & F_BYPASS_INBOUND) || f.dport == htons(ZTUNNEL_HBONE_PORT))
        return TC_ACT_UNSPEC;
    /* A retransmitted SYN of a conversation already under way takes the normal path. */
    if (owned_locally(skb, f.family, f.src, f.sport, f.dst, f.dport))
        return TC_ACT_UNSPEC;
    int nat_mode = s->flags & F_INBOUND_NAT;
    int err = assign(skb, &f, ZTUNNEL_INBOUND_PORT, nat_mode);
    if (err == -1) {
        /* No listener yet (ztunnel has not opened this namespace): drop, never deliver
         * around ztunnel; the client's SYN retransmission gets through once it listens. */
        count(C_NO_LISTENER);
        return TC_ACT_SHOT;
    }
    count(C_INBOUND);
    if (nat_mode || err)
        /* Linux < 6.5 refuses SO_REUSEPORT listeners such as ztunnel's (-ESOCKTNOSUPPORT):
         * rewrite the port instead. */
        return inbound_nat(skb, &f, 1);
    return TC_ACT_UNSPEC;
}

/* What arrives on a virtual interface (a VM's outbound traffic): TCP to ztunnel's 15001
 * at the interface's own address, as iptables' REDIRECT does in PREROUTING; the rest is
 * left alone. Without an address of the family the SYN is dropped, as REDIRECT drops it. */
int istio_virt_ingress(struct __sk_buff *skb)
{
    int zero = 0;
    struct settings *s = cfg.lookup(&zero);
    if (!s || !s->version)
        return TC_ACT_UNSPEC;
    struct flow f = {};
    if (parse(skb, &f, s->flags) || f.proto != IPPROTO_TCP)
        return TC_ACT_UNSPEC;
    __u32 ifindex = skb->ifindex;
    struct virt_addr *va = virt.lookup(&ifindex);
    if (!va)
        return TC_ACT_UNSPEC;
    __u32 to[4] = {};
    if (f.family == 4) {
        to[0] = va->addr4;
    } else {
        to[0] = va->addr6[0];
        to[1] = va->addr6[1];
        to[2] = va->addr6[2];
        to[3] = va->addr6[3];
    }
    if ((f.tcp_flags & (TH_SYN | TH_ACK)) == TH_SYN) {
        if (!to[0] && !to[1] && !to[2] && !to[3])
            return TC_ACT_SHOT;
        count(C_VIRTUAL);
        __u16 port = nat_open(skb, &f, to, ZTUNNEL_OUTBOUND_PORT, 0);
        if (!port || redirect_to(skb, &f, to, ZTUNNEL_OUTBOUND_PORT, port))
            return TC_ACT_SHOT;
        return TC_ACT_UNSPEC;
    }
    /* Later packets of a redirected conversation follow the same rewrite. */
    struct nat_fwd_val fv = {};
    if (captured(&f, &fv, 0) && fv.target == ZTUNNEL_OUTBOUND_PORT &&
        redirect_to(skb, &f, to, ZTUNNEL_OUTBOUND_PORT, fv.port))
        return TC_ACT_SHOT;
    return TC_ACT_UNSPEC;
}

/* ztunnel asks SO_ORIGINAL_DST of a connection it accepted on 15001/15053. Without
 * conntrack the kernel fails it; with conntrack active in the pod (some other netfilter
 * user) it answers the loopback address itself, having seen only the rewritten packets.
 * Either way the answer is in our NAT map (keyed by the client and the source port its
 * packets were given, which is the accepted socket's peer). A different conntrack
 * answer means someone else's NAT really happened: it is kept. */
int istio_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->optname != SO_ORIGINAL_DST)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct nat_key k = {};
    __u32 family = sk->family;
    k.port = sk->dst_port;
    k.proto = IPPROTO_TCP;
    __u16 local_port = sk->src_port;
    /* Inbound entries also carry the pod address (the conversation's local address);
     * outbound ones were made for the client's own address alone. */
    int inbound = local_port == ZTUNNEL_INBOUND_PORT;
    /* Conntrack's answer when it saw only our rewrite: the accepted socket's own address
     * (127.0.0.1/::1 for the pod's clients, a virtual interface's address for a VM's, the
     * pod address inbound). */
    __u32 expect4 = 0;
    __u32 expect6[4] = {};
    if (family == AF_INET && ctx->level == SOL_IP_LEVEL) {
        k.family = 4;
        k.addr[0] = sk->dst_ip4;
        expect4 = sk->src_ip4;
        if (inbound)
            k.local[0] = expect4;
    } else if (family == AF_INET6 && ctx->level == SOL_IP_LEVEL && sk->dst_ip6[0] == 0 &&
               sk->dst_ip6[1] == 0 && sk->dst_ip6[2] == htonl(0xffff)) {
        /* an IPv4 connection accepted by a dual-stack [::] listener (ztunnel's default):
         * ::ffff:a.b.c.d; SOL_IP is what ztunnel asks first, answered as for IPv4 */
        k.family = 4;
        k.addr[0] = sk->dst_ip6[3];
        expect4 = sk->src_ip6[3];
        if (inbound)
            k.local[0] = expect4;
    } else if (family == AF_INET6 && ctx->level == SOL_IPV6_LEVEL) {
        k.family = 6;
        k.addr[0] = sk->dst_ip6[0];
        k.addr[1] = sk->dst_ip6[1];
        k.addr[2] = sk->dst_ip6[2];
        k.addr[3] = sk->dst_ip6[3];
        expect6[0] = sk->src_ip6[0];
        expect6[1] = sk->src_ip6[1];
        expect6[2] = sk->src_ip6[2];
        expect6[3] = sk->src_ip6[3];
        if (inbound)
            __builtin_memcpy(k.local, expect6, 16);
    } else {
        return 1;
    }
    struct nat_val *v = nat.lookup(&k);
    if (!v || v->target != local_port)
        return 1;
    int answered = ctx->retval == 0;
    if (k.family == 4) {
        struct sockaddr_in *sa = ctx->optval;
        if ((void *)(sa + 1) > ctx->optval_end)
            return 1;
        if (answered && (sa->sin_addr.s_addr != expect4 || sa->sin_port != htons(local_port)))
            return 1;
        sa->sin_family = AF_INET;
        sa->sin_port = v->port;
        sa->sin_addr.s_addr = v->addr[0];
        ctx->optlen = sizeof(*sa);
    } else {
        struct sockaddr_in6 *sa6 = ctx->optval;
        if ((void *)(sa6 + 1) > ctx->optval_end)
            return 1;
        if (answered && (sa6->sin6_port != htons(local_port) ||
                         sa6->sin6_addr.in6_u.u6_addr32[0] != expect6[0] ||
                         sa6->sin6_addr.in6_u.u6_addr32[1] != expect6[1] ||
                         sa6->sin6_addr.in6_u.u6_addr32[2] != expect6[2] ||
                         sa6->sin6_addr.in6_u.u6_addr32[3] != expect6[3]))
            return 1;
        sa6->sin6_family = AF_INET6;
        sa6->sin6_port = v->port;
        sa6->sin6_flowinfo = 0;
        __builtin_memcpy(&sa6->sin6_addr, v->addr, 16);
        sa6->sin6_scope_id = 0;
        ctx->optlen = sizeof(*sa6);
    }
    ctx->retval = 0;
    return 1;
}
