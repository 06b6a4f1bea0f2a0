//! Property tests of our use of `ppp` when reading: whatever a peer sends, split into writes
//! at arbitrary points, `read_header` takes exactly one header's bytes or fails; it never takes
//! a byte of what follows (the TLS ClientHello or HTTP request behind the header). Over real
//! loopback sockets; the case counts keep them to a few seconds of a debug `cargo test`.

use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::tests::pair;
use super::*;

/// `n` cases, or `PROPTEST_CASES` when it is set (for a longer run).
fn cases(n: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { default.cases } else { n };
    ProptestConfig { cases, ..default }
}

/// Writes `bytes` in pieces cut at `cuts` (yielding between them, so the reader often sees a
/// piece before the next is sent), then EOF; returns what `read_header` gave and what it left.
fn run(bytes: &[u8], cuts: &[usize], max_v2: usize) -> (Result<Carried, HeaderError>, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (mut client, mut server) = pair().await;
        client.set_nodelay(true).unwrap();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.push(bytes.len());
        points.sort_unstable();
        let bytes = bytes.to_vec();
        let writer = tokio::spawn(async move {
            let mut at = 0;
            for p in points {
                client.write_all(&bytes[at..p]).await.unwrap();
                at = p;
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
        });
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), read_header(&mut server, max_v2))
            .await
            .expect("read_header returns once the writer has closed");
        let mut rest = Vec::new();
        if result.is_ok() {
            server.read_to_end(&mut rest).await.unwrap();
        }
        writer.await.unwrap();
        (result, rest)
    })
}

fn socket_addr(v6: bool) -> impl Strategy<Value = SocketAddr> {
    if v6 {
        any::<([u8; 16], u16)>().prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)).boxed()
    } else {
        any::<([u8; 4], u16)>().prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)).boxed()
    }
}

/// A well-formed header (v1 or v2, PROXY or LOCAL/UNKNOWN, TLVs of any kind), with what it
/// must be read as.
fn well_formed() -> impl Strategy<Value = (Vec<u8>, Carried)> {
    let proxied = any::<bool>().prop_flat_map(|v6| (socket_addr(v6), socket_addr(v6)));
    let tlvs = proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..4);
    prop_oneof![
        proxied.clone().prop_map(|(s, d)| {
            (v1::Addresses::from((s, d)).to_string().into_bytes(), Carried::Client { source: s, destination: d })
        }),
        Just((b"PROXY UNKNOWN\r\n".to_vec(), Carried::Balancer)),
        (proxied, tlvs.clone()).prop_map(|((s, d), tlvs)| {
            let mut b = v2::Builder::with_addresses(v2::Version::Two | Command::Proxy, Protocol::Stream, (s, d));
            for (kind, value) in &tlvs {
                b = b.write_tlv(*kind, value).unwrap();
            }
            (b.build().unwrap(), Carried::Client { source: s, destination: d })
        }),
        tlvs.prop_map(|tlvs| {
            let mut b = v2::Builder::new(0x20, 0x00);
            for (kind, value) in &tlvs {
                b = b.write_tlv(*kind, value).unwrap();
            }
            (b.build().unwrap(), Carried::Balancer)
        }),
    ]
}

proptest! {
    #![proptest_config(cases(200))]

    /// A well-formed header is read as what it says, and every byte behind it stays in the
    /// socket, however the writes were cut.
    #[test]
    fn well_formed_headers_are_read_exactly(
        (header, expected) in well_formed(),
        behind in proptest::collection::vec(any::<u8>(), 0..64),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let bytes = [header.as_slice(), &behind].concat();
        let (result, rest) = run(&bytes, &cuts, 4096);
        prop_assert_eq!(result.unwrap(), expected);
        prop_assert_eq!(rest, behind);
    }

    /// Arbitrary bytes (often starting like a header): either an error, or a header whose
    /// bytes `ppp` parses as exactly what was taken, with the rest left in the socket.
    #[test]
    fn arbitrary_bytes_never_overread(
        start in prop_oneof![
            Just(b"PROXY ".to_vec()),
            Just(b"PROXY TCP4 ".to_vec()),
            Just(v2::PROTOCOL_PREFIX.to_vec()),
            Just([v2::PROTOCOL_PREFIX, &[0x21, 0x11, 0, 12]].concat()),
            Just(Vec::new()),
        ],
        tail in proptest::collection::vec(any::<u8>(), 0..160),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let bytes = [start.as_slice(), &tail].concat();
        let (result, rest) = run(&bytes, &cuts, 4096);
        if result.is_ok() {
            let taken = bytes.len() - rest.len();
            prop_assert_eq!(&bytes[taken..], rest.as_slice());
            let v1_len = v1::Header::try_from(&bytes[..taken]).map(|h| h.header.len()).ok();
            let v2_len = v2::Header::try_from(&bytes[..taken]).map(|h| h.len()).ok();
            prop_assert!(v1_len == Some(taken) || v2_len == Some(taken), "took {} of {:?}", taken, bytes);
        }
    }
}
