//! A reader for the pcap files `tcpdump -w` writes (classic pcap, micro- or
//! nanosecond timestamps, either byte order; Ethernet framing as on `lo`,
//! Linux cooked captures, raw IP), down to the TCP segments over IPv4 or
//! IPv6. The file is input: every length in it is bounds-checked, and a
//! record cut short (a capture stopped mid-write) ends the reading.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// One TCP segment of a capture.
#[derive(Debug, Clone)]
pub struct Segment<'a> {
    /// Capture time, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// Bytes of the IP packet as sent: the IPv4 total length, or the IPv6
    /// payload length + its 40-byte header (the wire size less the link
    /// layer's framing).
    pub ip_len: usize,
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// Sequence number.
    pub seq: u32,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub flags: u8,
    /// Bytes of TCP payload in the packet (from the IP header, so also
    /// when the capture's snap length cut `payload` short).
    pub payload_len: usize,
    /// The captured part of the payload.
    pub payload: &'a [u8],
}

impl Segment<'_> {
    /// SYN set.
    pub fn syn(&self) -> bool {
        self.flags & 0x02 != 0
    }

    /// FIN or RST set.
    pub fn fin_or_rst(&self) -> bool {
        self.flags & 0x05 != 0
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The IP packet in a link-layer frame of `linktype`, and its IP version
/// (4 or 6) when the framing says it.
fn ip_of(linktype: u32, frame: &[u8]) -> Option<(u8, &[u8])> {
    fn by_ethertype(t: u16, ip: &[u8]) -> Option<(u8, &[u8])> {
        match t {
            0x0800 => Some((4, ip)),
            0x86dd => Some((6, ip)),
            _ => None,
        }
    }
    match linktype {
        // Ethernet (what `-i lo` gives on Linux).
        1 => by_ethertype(be16(frame, 12)?, frame.get(14..)?),
        // Linux cooked capture v1 and v2 (`-i any`).
        113 => by_ethertype(be16(frame, 14)?, frame.get(16..)?),
        276 => by_ethertype(be16(frame, 0)?, frame.get(20..)?),
        // Raw IP.
        101 | 228 | 229 => {
            let v = frame.first()? >> 4;
            (v == 4 || v == 6).then_some((v, frame))
        }
        // BSD loopback: the address family in host order.
        0 => {
            let family = u32::from_ne_bytes(frame.get(..4)?.try_into().ok()?);
            let ip = frame.get(4..)?;
            match family {
                2 => Some((4, ip)),
                10 | 24 | 28 | 30 => Some((6, ip)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The TCP segment in an IP packet; `None` for anything else or a header
/// cut short. `ts_ns` and `orig_ip_len` (the packet's length on the wire,
/// from the record, for a header that does not say) are the record's.
fn tcp_of(ts_ns: u64, version: u8, ip: &[u8], orig_ip_len: usize) -> Option<Segment<'_>> {
    let (src, dst, ip_len, ip_header, tcp) = match version {
        4 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            if ihl < 20 || *ip.get(9)? != 6 {
                return None;
            }
            // A total length of 0 is a segmentation-offloaded packet over
            // 64 KiB: its length is the record's.
            let total = match usize::from(be16(ip, 2)?) {
                0 => orig_ip_len,
                n => n,
            };
            let src = Ipv4Addr::from(be32(ip, 12)?);
            let dst = Ipv4Addr::from(be32(ip, 16)?);
            let tcp = ip.get(ihl..total.min(ip.len()).max(ihl))?;
            (IpAddr::V4(src), IpAddr::V4(dst), total, ihl, tcp)
        }
        6 => {
            // Extension headers are not followed: TCP right after the header.
            if *ip.get(6)? != 6 {
                return None;
            }
            let total = 40 + usize::from(be16(ip, 4)?);
            let addr = |at: usize| -> Option<Ipv6Addr> {
                let b: [u8; 16] = ip.get(at..at + 16)?.try_into().ok()?;
                Some(Ipv6Addr::from(b))
            };
            let tcp = ip.get(40..total.min(ip.len()).max(40))?;
            (IpAddr::V6(addr(8)?), IpAddr::V6(addr(24)?), total, 40, tcp)
        }
        _ => return None,
    };
    let data_at = usize::from(tcp.get(12)? >> 4) * 4;
    if data_at < 20 || tcp.len() < 20 {
        return None;
    }
    Some(Segment {
        ts_ns,
        ip_len,
        src: SocketAddr::new(src, be16(tcp, 0)?),
        dst: SocketAddr::new(dst, be16(tcp, 2)?),
        seq: be32(tcp, 4)?,
        flags: *tcp.get(13)?,
        payload_len: ip_len.saturating_sub(ip_header + data_at),
        payload: tcp.get(data_at..).unwrap_or_default(),
    })
}

/// Every TCP segment in a pcap file, in capture order.
pub fn tcp_segments(pcap: &[u8]) -> Result<Vec<Segment<'_>>, String> {
    let (le, nanos) = match pcap.get(..4) {
        Some([0xd4, 0xc3, 0xb2, 0xa1]) => (true, false),
        Some([0x4d, 0x3c, 0xb2, 0xa1]) => (true, true),
        Some([0xa1, 0xb2, 0xc3, 0xd4]) => (false, false),
        Some([0xa1, 0xb2, 0x3c, 0x4d]) => (false, true),
        other => return Err(format!("not a pcap file (magic {other:?})")),
    };
    let u32_at = |at: usize| -> Option<u32> {
        let w: [u8; 4] = pcap.get(at..at + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        })
    };
    let linktype = u32_at(20).ok_or("a pcap file header cut short")? & 0x0fff_ffff;
    let mut out = Vec::new();
    let mut at = 24;
    while let (Some(secs), Some(frac), Some(incl), Some(orig)) =
        (u32_at(at), u32_at(at + 4), u32_at(at + 8), u32_at(at + 12))
    {
        let (Ok(incl), Ok(orig)) = (usize::try_from(incl), usize::try_from(orig)) else {
            break;
        };
        let Some(frame) = pcap.get(at + 16..at + 16 + incl) else {
            break;
        };
        at += 16 + incl;
        let ts_ns = u64::from(secs) * 1_000_000_000
            + if nanos {
                u64::from(frac)
            } else {
                u64::from(frac) * 1_000
            };
        let Some((version, ip)) = ip_of(linktype, frame) else {
            continue;
        };
        let link = frame.len() - ip.len();
        if let Some(s) = tcp_of(ts_ns, version, ip, orig.saturating_sub(link)) {
            out.push(s);
        }
    }
    Ok(out)
}

/// The TCP payload of every flow (one direction of a connection) in a pcap
/// file, in sequence order with retransmitted bytes dropped: a value split
/// across two segments is still found.
pub fn tcp_streams(pcap: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    /// A flow (sender, receiver), the next sequence number expected, its bytes.
    type Flow = ((SocketAddr, SocketAddr), Option<u32>, Vec<u8>);
    let mut flows: Vec<Flow> = Vec::new();
    for s in tcp_segments(pcap)? {
        let key = (s.src, s.dst);
        let i = match flows.iter().position(|(k, _, _)| *k == key) {
            Some(i) => i,
            None => {
                flows.push((key, None, Vec::new()));
                flows.len() - 1
            }
        };
        let (_, next, bytes) = &mut flows[i];
        if s.syn() {
            *next = Some(s.seq.wrapping_add(1));
            bytes.clear();
            continue;
        }
        let expected = next.unwrap_or(s.seq);
        // Bytes before `expected` were had already (a retransmission).
        let skip = usize::try_from(expected.wrapping_sub(s.seq)).unwrap_or(usize::MAX);
        if let Some(new) = s.payload.get(skip..).filter(|n| !n.is_empty()) {
            bytes.extend_from_slice(new);
            let len = u32::try_from(s.payload.len()).unwrap_or(u32::MAX);
            *next = Some(s.seq.wrapping_add(len));
        } else if next.is_none() {
            *next = Some(s.seq);
        }
    }
    Ok(flows.into_iter().map(|(_, _, b)| b).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian microsecond pcap (Ethernet) of IPv4 TCP segments.
    fn capture(segments: &[(u32, &[u8])]) -> Vec<u8> {
        let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        pcap.extend_from_slice(&[0; 8]);
        pcap.extend_from_slice(&65535u32.to_le_bytes());
        pcap.extend_from_slice(&1u32.to_le_bytes());
        for (seq, data) in segments {
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&[0x08, 0x00]);
            let mut ip = vec![
                0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1,
            ];
            let total = u16::try_from(20 + 20 + data.len()).unwrap_or(u16::MAX);
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            let mut tcp = vec![0x30, 0x39, 0x1f, 0x90];
            tcp.extend_from_slice(&seq.to_be_bytes());
            tcp.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x18, 0, 0, 0, 0, 0, 0]);
            f.extend_from_slice(&ip);
            f.extend_from_slice(&tcp);
            f.extend_from_slice(data);
            let mut rec = vec![1, 0, 0, 0, 5, 0, 0, 0];
            let len = u32::try_from(f.len()).unwrap_or(u32::MAX);
            rec.extend_from_slice(&len.to_le_bytes());
            rec.extend_from_slice(&len.to_le_bytes());
            rec.extend_from_slice(&f);
            pcap.extend(rec);
        }
        pcap
    }

    #[test]
    fn segments_and_streams() {
        let pcap = capture(&[
            (1000, b"xx find-me-0123"),
            (1015, b"456789abcdef yy"),
            (1015, b"456789abcdef yy"),
        ]);
        let segs = tcp_segments(&pcap).expect("a pcap");
        assert_eq!(segs.len(), 3);
        assert_eq!(segs[0].ip_len, 40 + 15);
        assert_eq!(segs[0].payload_len, 15);
        assert_eq!(segs[0].ts_ns, 1_000_005_000);
        assert_eq!(segs[0].src.port(), 12345);
        assert_eq!(segs[0].dst.port(), 8080);
        assert_eq!(
            tcp_streams(&pcap).expect("a pcap"),
            vec![b"xx find-me-0123456789abcdef yy".to_vec()]
        );
    }

    #[test]
    fn cut_short_and_garbage_input_is_no_panic() {
        let pcap = capture(&[(1, b"abc"), (4, b"def")]);
        for n in 0..pcap.len() {
            let _ = tcp_segments(&pcap[..n]);
            let _ = tcp_streams(&pcap[..n]);
        }
        assert!(tcp_segments(b"nope").is_err());
        // A record claiming more than there is ends the reading.
        let mut bad = pcap.clone();
        bad[24 + 8..24 + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(tcp_segments(&bad).map(|s| s.len()), Ok(0));
        // A header length field pointing past the packet.
        let mut bad = pcap;
        bad[24 + 16 + 14] = 0x4f;
        assert!(tcp_segments(&bad).is_ok());
    }
}
