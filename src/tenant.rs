//! Request -> tenant id. Everything a request carries is untrusted: ids are length-capped,
//! limited to visible ASCII, and an invalid id falls through to the next source and finally
//! to `tenant.default`, so a malformed header can never skip the limiter.

pub const MAX_TENANT_LEN: usize = 128;

/// Where a tenant id may come from, tried in the configured order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantSource {
    /// A request header (name lower-cased at config time).
    Header(String),
    /// A query parameter of `:path` (first occurrence, percent-decoded).
    Query(String),
    /// Envoy's downstream address (`source.address`), port stripped. With
    /// `trusted_client_address: false` (the `{"source_ip": true}` form) only an address that is
    /// the TCP peer counts: one Envoy derived from a request header (X-Forwarded-For or an
    /// original-IP detection extension) is refused, because under Envoy's default connection
    /// manager settings any client can write it. `true` takes Envoy's address as it is, which is
    /// only as trustworthy as the listener's `use_remote_address` / `xff_num_trusted_hops`.
    SourceIp { trusted_client_address: bool },
    /// The client entry of `x-forwarded-for`, skipping `trusted_hops` entries from the right.
    Xff { trusted_hops: u32 },
    /// The URI SAN of the mTLS peer certificate.
    PeerPrincipal,
    /// A claim of the payload `jwt_authn` verified and wrote to dynamic metadata, under
    /// `metadata_key`, or when that is `None` under [`JWT_DEFAULT_KEYS`] (first found wins).
    JwtClaim { metadata_key: Option<String>, claim_path: Vec<String> },
}

/// A tenant id in a fixed buffer, so the request path does not allocate for it.
#[derive(Clone, Copy)]
pub struct TenantId {
    buf: [u8; MAX_TENANT_LEN],
    len: usize,
}

impl TenantId {
    /// `None` unless `bytes` is a valid id.
    pub fn new(bytes: &[u8]) -> Option<TenantId> {
        if !is_valid_tenant_id(bytes) {
            return None;
        }
        let mut buf = [0u8; MAX_TENANT_LEN];
        buf.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(TenantId { buf, len: bytes.len() })
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }

    /// Ids are visible ASCII, so this never fails; the fallback is for the type system.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

impl std::fmt::Debug for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TenantId({:?})", self.as_str())
    }
}

/// 1..=128 bytes of visible ASCII (0x21..=0x7e): no spaces, no control characters, no
/// non-ASCII (which would make ids that look equal but are not).
pub fn is_valid_tenant_id(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.len() <= MAX_TENANT_LEN && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// The first value of query parameter `name` in a request path, percent-decoded into `out`.
/// `None` if absent, or if it does not fit or decode (the caller then tries the next source).
pub fn query_param<'o>(path: &[u8], name: &[u8], out: &'o mut [u8; MAX_TENANT_LEN]) -> Option<&'o [u8]> {
    let start = path.iter().position(|&b| b == b'?')? + 1;
    let query = path.get(start..)?;
    let query = match query.iter().position(|&b| b == b'#') {
        Some(end) => query.get(..end)?,
        None => query,
    };
    for pair in query.split(|&b| b == b'&') {
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (pair.get(..eq)?, pair.get(eq + 1..)?),
            None => (pair, &b""[..]),
        };
        if key == name {
            let len = percent_decode(value, out)?;
            return out.get(..len);
        }
    }
    None
}

/// Decodes `%XX` escapes; `None` on a bad escape or if the result would not fit in `out`.
fn percent_decode(input: &[u8], out: &mut [u8; MAX_TENANT_LEN]) -> Option<usize> {
    let mut len = 0;
    let mut i = 0;
    while i < input.len() {
        let b = *input.get(i)?;
        let decoded = if b == b'%' {
            let hi = hex(*input.get(i + 1)?)?;
            let lo = hex(*input.get(i + 2)?)?;
            i += 3;
            hi << 4 | lo
        } else {
            i += 1;
            b
        };
        *out.get_mut(len)? = decoded;
        len += 1;
    }
    Some(len)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `1.2.3.4:5678` -> `1.2.3.4`, `[::1]:5678` -> `::1`; an address without a port is kept.
pub fn strip_port(addr: &[u8]) -> &[u8] {
    if let Some(rest) = addr.strip_prefix(b"[") {
        return match rest.iter().position(|&b| b == b']') {
            Some(end) => rest.get(..end).unwrap_or(rest),
            None => rest,
        };
    }
    let colons = addr.iter().filter(|&&b| b == b':').count();
    match (colons, addr.iter().rposition(|&b| b == b':')) {
        (1, Some(i)) => addr.get(..i).unwrap_or(addr),
        _ => addr, // bare IPv6 or no port
    }
}

/// The client address of an `x-forwarded-for` value: the entry `trusted_hops + 1` from the
/// right (Envoy's `xff_num_trusted_hops` rule). Entries a client prepends sit further left,
/// so they cannot pick the result. `None` when the header has too few entries.
pub fn xff_client(xff: &[u8], trusted_hops: u32) -> Option<&[u8]> {
    let entry = xff.rsplit(|&b| b == b',').nth(trusted_hops as usize)?;
    let entry = entry.trim_ascii();
    if entry.is_empty() {
        None
    } else {
        Some(entry)
    }
}

/// What the host can tell about a request, asked lazily and only for configured sources and
/// rules (`rules::Lookup` asks each at most once per request).
pub trait RequestFacts {
    fn header(&mut self, name: &str) -> Option<Vec<u8>>;
    fn path(&mut self) -> Option<&[u8]>;
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>>;

    /// The name of the Envoy route the request matched: Envoy (1.40) answers `xds.route_name`
    /// with `route()->routeName()`, set before any HTTP filter runs (empty for a route without
    /// a name; absent when no route matched).
    fn route_name(&mut self) -> Option<Vec<u8>> {
        self.property(&["xds", "route_name"])
    }
}

/// The dynamic-metadata namespace Envoy's `jwt_authn` filter writes verified payloads to.
pub const JWT_AUTHN_NAMESPACE: &str = "envoy.filters.http.jwt_authn";

/// Where `jwt_claim` looks for the payload when no `metadata_key` is configured: `payload` is
/// the `payload_in_metadata` Istio's RequestAuthentication sets (istio/istio
/// pilot/pkg/security/authn/policy_applier.go, `filters.EnvoyJwtFilterPayload`); `jwt_payload`
/// was this filter's earlier default and stays so existing Envoy configs keep working. The
/// second key is read only when the first is absent.
pub const JWT_DEFAULT_KEYS: [&str; 2] = ["payload", "jwt_payload"];

/// Tries each source in order; the first present and valid id wins, else `default`.
pub fn resolve(sources: &[TenantSource], default: &TenantId, facts: &mut impl RequestFacts) -> TenantId {
    resolve_from(sources, default, facts).0
}

/// Where a resolved tenant id came from (the checker's `--explain` prints it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `tenant.from[i]`.
    Source(usize),
    /// No source gave a valid id: `tenant.default`.
    Default,
    /// `tenant.from[i]` is a header-derived address under `{"source_ip": true}`: `tenant.default`.
    Refused(usize),
}

/// [`resolve`], also saying which source decided.
pub fn resolve_from(sources: &[TenantSource], default: &TenantId, facts: &mut impl RequestFacts) -> (TenantId, Origin) {
    match first_source(sources, facts) {
        Ok((id, i)) => (id, Origin::Source(i)),
        Err(Some(i)) => (*default, Origin::Refused(i)),
        Err(None) => (*default, Origin::Default),
    }
}

/// The first present and valid value of `sources` (a plan name: `tenant.plan_from`); `None`
/// when none is, or when a source applies but its value came from the client (see
/// [`Found::Untrusted`]).
pub fn first_present(sources: &[TenantSource], facts: &mut impl RequestFacts) -> Option<TenantId> {
    first_source(sources, facts).ok().map(|(id, _)| id)
}

/// The first present and valid value and its source's index; `Err(Some(i))` when source `i`
/// applies but its value came from the client, `Err(None)` when no source gave one.
fn first_source(sources: &[TenantSource], facts: &mut impl RequestFacts) -> Result<(TenantId, usize), Option<usize>> {
    for (i, source) in sources.iter().enumerate() {
        match from_source(source, facts) {
            Found::Id(id) => return Ok((id, i)),
            Found::Nothing => {}
            Found::Untrusted => return Err(Some(i)),
        }
    }
    Err(None)
}

/// What one source yields for a request.
enum Found {
    Id(TenantId),
    /// Absent or invalid: try the next source.
    Nothing,
    /// The source applies but its value came from the client (a header-derived address under
    /// `{"source_ip": true}`): the request goes to `tenant.default` without trying later
    /// sources, so the header cannot pick a bucket, directly or by unlocking a later source.
    Untrusted,
}

impl From<Option<TenantId>> for Found {
    fn from(id: Option<TenantId>) -> Found {
        id.map_or(Found::Nothing, Found::Id)
    }
}

fn from_source(source: &TenantSource, facts: &mut impl RequestFacts) -> Found {
    match source {
        TenantSource::SourceIp { trusted_client_address } => {
            let Some(addr) = facts.property(&["source", "address"]) else {
                return Found::Nothing;
            };
            if !trusted_client_address && is_header_derived(&addr) {
                return Found::Untrusted;
            }
            TenantId::new(strip_port(&addr)).into()
        }
        other => id_from_source(other, facts).into(),
    }
}

/// True for an address Envoy took from a request header rather than from the connection.
/// Envoy parses X-Forwarded-For (and the custom-header detection extension's header) into an
/// address with port 0, while a TCP peer always has a nonzero port; so `ip:0` / `[ip]:0` is
/// the mark of a header-derived address. The proxy-wasm host exposes no property with the TCP
/// peer itself when Envoy replaced it (Envoy 1.40: `source.*` is the possibly derived address).
pub fn is_header_derived(addr: &[u8]) -> bool {
    port(addr) == Some(&b"0"[..])
}

/// The port of `1.2.3.4:5678` or `[::1]:5678`; `None` for an address without one.
fn port(addr: &[u8]) -> Option<&[u8]> {
    let colon = addr.iter().rposition(|&b| b == b':')?;
    let (host, port) = (addr.get(..colon)?, addr.get(colon + 1..)?);
    let bracketed = host.starts_with(b"[") && host.ends_with(b"]");
    let one_colon = !host.contains(&b':');
    (bracketed || one_colon).then_some(port)
}

fn id_from_source(source: &TenantSource, facts: &mut impl RequestFacts) -> Option<TenantId> {
    match source {
        TenantSource::Header(name) => TenantId::new(&facts.header(name)?),
        TenantSource::Query(name) => {
            let mut buf = [0u8; MAX_TENANT_LEN];
            let path = facts.path()?;
            TenantId::new(query_param(path, name.as_bytes(), &mut buf)?)
        }
        TenantSource::SourceIp { .. } => None, // from_source decides on addresses
        TenantSource::Xff { trusted_hops } => {
            let xff = facts.header("x-forwarded-for")?;
            TenantId::new(xff_client(&xff, *trusted_hops)?)
        }
        TenantSource::PeerPrincipal => TenantId::new(&facts.property(&["connection", "uri_san_peer_certificate"])?),
        TenantSource::JwtClaim { metadata_key, claim_path } => {
            let [istio, legacy] = JWT_DEFAULT_KEYS;
            let (first, second) = match metadata_key {
                Some(key) => (key.as_str(), None),
                None => (istio, Some(legacy)),
            };
            let mut path: Vec<&str> = vec!["metadata", "filter_metadata", JWT_AUTHN_NAMESPACE, first];
            path.extend(claim_path.iter().map(String::as_str));
            let value = match (facts.property(&path), second) {
                (Some(value), _) => value,
                (None, Some(key)) => {
                    *path.get_mut(3)? = key;
                    facts.property(&path)?
                }
                (None, None) => return None,
            };
            TenantId::new(&value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Default)]
    struct Facts {
        headers: Vec<(String, Vec<u8>)>,
        path: Vec<u8>,
        source: Option<Vec<u8>>,
        /// Other properties, by path joined with '.'.
        props: Vec<(String, Vec<u8>)>,
        asked: Vec<String>,
    }

    impl RequestFacts for Facts {
        fn header(&mut self, name: &str) -> Option<Vec<u8>> {
            self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
        }
        fn path(&mut self) -> Option<&[u8]> {
            Some(&self.path)
        }
        fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
            let joined = path.join(".");
            self.asked.push(joined.clone());
            if path == ["source", "address"] {
                self.source.clone()
            } else {
                self.props.iter().find(|(p, _)| *p == joined).map(|(_, v)| v.clone())
            }
        }
    }

    fn default_id() -> TenantId {
        TenantId::new(b"default").unwrap()
    }

    fn sources() -> Vec<TenantSource> {
        vec![
            TenantSource::Header("x-tenant-id".into()),
            TenantSource::Query("tenant".into()),
            TenantSource::SourceIp { trusted_client_address: false },
        ]
    }

    #[test]
    fn first_valid_source_wins() {
        let mut f = Facts {
            headers: vec![("x-tenant-id".into(), b"acme".to_vec())],
            path: b"/x?tenant=globex".to_vec(),
            ..Default::default()
        };
        assert_eq!(resolve(&sources(), &default_id(), &mut f).as_str(), "acme");
        f.headers.clear();
        assert_eq!(resolve(&sources(), &default_id(), &mut f).as_str(), "globex");
        f.path = b"/x".to_vec();
        f.source = Some(b"[2001:db8::1]:443".to_vec());
        assert_eq!(resolve(&sources(), &default_id(), &mut f).as_str(), "2001:db8::1");
        f.source = None;
        assert_eq!(resolve(&sources(), &default_id(), &mut f).as_str(), "default");
    }

    #[test]
    fn invalid_ids_fall_through() {
        let mut f = Facts {
            headers: vec![("x-tenant-id".into(), b"bad\x01id".to_vec())],
            path: b"/?tenant=ok".to_vec(),
            ..Default::default()
        };
        assert_eq!(resolve(&sources(), &default_id(), &mut f).as_str(), "ok");
        f.headers = vec![("x-tenant-id".into(), vec![b'a'; 129])];
        f.path = b"/?tenant=has%20space".to_vec();
        assert_eq!(resolve(&sources(), &default_id(), &mut f).as_str(), "default");
        f.headers = vec![("x-tenant-id".into(), "caf\u{e9}".as_bytes().to_vec())];
        assert_eq!(resolve(&sources(), &default_id(), &mut f).as_str(), "default");
        f.headers = vec![("x-tenant-id".into(), Vec::new())];
        assert_eq!(resolve(&sources(), &default_id(), &mut f).as_str(), "default");
    }

    #[test]
    fn query_parsing() {
        let mut buf = [0u8; MAX_TENANT_LEN];
        assert_eq!(query_param(b"/a?x=1&tenant=ac%6De&tenant=b", b"tenant", &mut buf), Some(&b"acme"[..]));
        assert_eq!(query_param(b"/a?tenantx=1", b"tenant", &mut buf), None);
        assert_eq!(query_param(b"/a?tenant=%zz", b"tenant", &mut buf), None);
        assert_eq!(query_param(b"/a?tenant=%4", b"tenant", &mut buf), None);
        assert_eq!(query_param(b"/a?tenant=a#frag", b"tenant", &mut buf), Some(&b"a"[..]));
        assert_eq!(query_param(b"/a", b"tenant", &mut buf), None);
        let long = [b"/?tenant=".as_slice(), &[b'a'; 200]].concat();
        assert_eq!(query_param(&long, b"tenant", &mut buf), None);
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port(b"10.0.0.1:5678"), b"10.0.0.1");
        assert_eq!(strip_port(b"[::1]:80"), b"::1");
        assert_eq!(strip_port(b"::1"), b"::1");
        assert_eq!(strip_port(b"10.0.0.1"), b"10.0.0.1");
    }

    #[test]
    fn header_derived_addresses_are_recognised() {
        assert!(is_header_derived(b"7.7.7.7:0"));
        assert!(is_header_derived(b"[2001:db8::7]:0"));
        assert!(!is_header_derived(b"127.0.0.1:40000"));
        assert!(!is_header_derived(b"[::1]:0x"));
        assert!(!is_header_derived(b"[::1]:10"));
        assert!(!is_header_derived(b"2001:db8::0")); // bare IPv6, no port
        assert!(!is_header_derived(b"/tmp/envoy.sock"));
        assert!(!is_header_derived(b"7.7.7.7"));
    }

    #[test]
    fn source_ip_refuses_a_header_derived_address_and_skips_later_sources() {
        let peer_then_header = |trusted| {
            vec![TenantSource::SourceIp { trusted_client_address: trusted }, TenantSource::Header("x-tenant-id".into())]
        };
        let mut f = Facts {
            headers: vec![("x-tenant-id".into(), b"chosen".to_vec())],
            source: Some(b"127.0.0.1:40000".to_vec()),
            ..Default::default()
        };
        assert_eq!(resolve(&peer_then_header(false), &default_id(), &mut f).as_str(), "127.0.0.1");
        // Envoy took 7.7.7.7 from X-Forwarded-For: neither it nor the header source decides
        f.source = Some(b"7.7.7.7:0".to_vec());
        assert_eq!(resolve(&peer_then_header(false), &default_id(), &mut f).as_str(), "default");
        f.source = Some(b"[2001:db8::7]:0".to_vec());
        assert_eq!(resolve(&peer_then_header(false), &default_id(), &mut f).as_str(), "default");
        // the explicit opt-in takes Envoy's address as it is
        assert_eq!(resolve(&peer_then_header(true), &default_id(), &mut f).as_str(), "2001:db8::7");
        // no address at all: the next source, as before
        f.source = None;
        assert_eq!(resolve(&peer_then_header(false), &default_id(), &mut f).as_str(), "chosen");
    }

    #[test]
    fn jwt_claim_default_key_is_istios_then_the_legacy_one() {
        let jwt = |key: Option<&str>| {
            vec![TenantSource::JwtClaim { metadata_key: key.map(str::to_string), claim_path: vec!["sub".into()] }]
        };
        let ns = "metadata.filter_metadata.envoy.filters.http.jwt_authn";
        let mut f = Facts { props: vec![(format!("{ns}.payload.sub"), b"istio".to_vec())], ..Default::default() };
        assert_eq!(resolve(&jwt(None), &default_id(), &mut f).as_str(), "istio");
        assert_eq!(f.asked.len(), 1, "one host call when Istio's key is present");
        f.props = vec![(format!("{ns}.jwt_payload.sub"), b"legacy".to_vec())];
        assert_eq!(resolve(&jwt(None), &default_id(), &mut f).as_str(), "legacy");
        f.props.push((format!("{ns}.payload.sub"), b"istio".to_vec()));
        assert_eq!(resolve(&jwt(Some("jwt_payload")), &default_id(), &mut f).as_str(), "legacy");
        f.props.clear();
        f.asked.clear();
        assert_eq!(resolve(&jwt(Some("mine")), &default_id(), &mut f).as_str(), "default");
        assert_eq!(f.asked, vec![format!("{ns}.mine.sub")]);
    }

    #[test]
    fn xff_takes_entry_from_the_right() {
        assert_eq!(xff_client(b"1.1.1.1", 0), Some(&b"1.1.1.1"[..]));
        assert_eq!(xff_client(b"6.6.6.6, 1.1.1.1, 10.0.0.1", 1), Some(&b"1.1.1.1"[..]));
        assert_eq!(xff_client(b"1.1.1.1", 1), None);
        assert_eq!(xff_client(b"a, ,b", 1), None);
    }

    proptest! {
        #[test]
        fn any_bytes_resolve_to_a_valid_id(header: Vec<u8>, path: Vec<u8>, src: Vec<u8>) {
            let mut f = Facts { headers: vec![("x-tenant-id".into(), header)], path, source: Some(src), ..Default::default() };
            let id = resolve(&sources(), &default_id(), &mut f);
            prop_assert!(is_valid_tenant_id(id.as_bytes()));
        }
    }
}
