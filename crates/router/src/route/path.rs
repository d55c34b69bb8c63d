//! Parsing of client request paths:
//! `/api/<region>/<cluster>/<owner>/<app>/<service>/<wsid>/<module>/<function>[?query]`.
//!
//! Runs on every request: every field of [`ApiPath`] is a slice of the input, nothing is
//! allocated, nothing is decoded. Percent-encoding is refused rather than decoded, so one
//! target has exactly one spelling.

/// A parsed API path; every `&str` borrows from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiPath<'a> {
    /// Region of the target cluster.
    pub region: &'a str,
    /// Target cluster within its region.
    pub cluster: &'a str,
    /// App owner.
    pub owner: &'a str,
    /// App name.
    pub app: &'a str,
    /// `owner/app` as one slice of the input: the key of the routing table.
    pub app_name: &'a str,
    /// Service of the app (`auth` may be anonymous).
    pub service: &'a str,
    /// The `<wsid>` segment; selects the partition (`wsid % partitions`).
    pub wsid: u64,
    /// Module within the service.
    pub module: &'a str,
    /// Function within the module.
    pub function: &'a str,
}

/// Why a path was refused. Always the client's fault; retrying the same path never helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Does not start with `/api/`.
    #[error("not an /api/ path")]
    NotApi,
    /// Wrong number of segments, an empty segment, `.` or `..`, or a character outside
    /// `[A-Za-z0-9._~-]`.
    #[error("malformed /api/ path")]
    BadPath,
    /// The wsid segment is not a decimal u64 (digits only, no sign).
    #[error("wsid is not a decimal u64")]
    BadWsid,
}

impl PathError {
    /// Stable machine-readable code for error bodies and metrics labels.
    pub fn code(self) -> &'static str {
        match self {
            Self::NotApi => "not_found",
            Self::BadPath => "bad_path",
            Self::BadWsid => "bad_wsid",
        }
    }

    /// The HTTP status a client gets for this error.
    pub fn http_status(self) -> u16 {
        match self {
            Self::NotApi => 404,
            Self::BadPath | Self::BadWsid => 400,
        }
    }
}

const SEGMENTS: usize = 8;
const OWNER: usize = 2;
const APP: usize = 3;
const WSID: usize = 5;

/// Parses an HTTP request target. The query string, if any, is ignored.
///
/// One pass over the bytes with a table of the allowed characters. It replaced `split('?')`,
/// `split('/')` and a per-segment `bytes().all(..)`, which together were 3.5% of a shard's CPU
/// at 8x8 pipelined (perf, `fedbus bench --connections 8 --inflight 8 --size 64B`); the tests
/// below check it against that version ([`tests::reference`]) on generated paths.
pub fn parse_api_path(path: &str) -> Result<ApiPath<'_>, PathError> {
    let rest = path.strip_prefix("/api/").ok_or(PathError::NotApi)?;
    let b = rest.as_bytes();
    // Segment i is rest[starts[i]..ends[i]]. Cut at `/` and `?`, which are ASCII, so every
    // slice below falls on a character boundary.
    let mut starts = [0usize; SEGMENTS];
    let mut ends = [0usize; SEGMENTS];
    let mut n = 0;
    let mut allowed = true;
    let mut end = b.len();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'?' => {
                end = i;
                break;
            }
            b'/' => {
                if n == SEGMENTS - 1 {
                    return Err(PathError::BadPath);
                }
                ends[n] = i;
                n += 1;
                starts[n] = i + 1;
            }
            // The wsid segment's characters are judged by `parse_wsid` (a `BadWsid`).
            _ if n != WSID => allowed &= UNRESERVED[usize::from(c)],
            _ => {}
        }
    }
    ends[n] = end;
    if n != SEGMENTS - 1 || !allowed {
        return Err(PathError::BadPath);
    }
    let seg = |i: usize| &rest[starts[i]..ends[i]];
    for i in 0..SEGMENTS {
        let s = seg(i);
        if s.is_empty() || (i != WSID && (s == "." || s == "..")) {
            return Err(PathError::BadPath);
        }
    }
    let wsid = parse_wsid(seg(WSID)).ok_or(PathError::BadWsid)?;
    Ok(ApiPath {
        region: seg(0),
        cluster: seg(1),
        owner: seg(OWNER),
        app: seg(APP),
        app_name: &rest[starts[OWNER]..ends[APP]],
        service: seg(4),
        wsid,
        module: seg(6),
        function: seg(7),
    })
}

/// The unreserved characters of RFC 3986 (`A-Z a-z 0-9 . _ ~ -`): the only ones a segment may
/// hold, so that one target has one spelling (no percent-encoding, nothing to decode).
const UNRESERVED: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-');
        c += 1;
    }
    t
};

fn parse_wsid(seg: &str) -> Option<u64> {
    // `u64::from_str` would accept a leading `+`.
    seg.bytes().try_fold(0u64, |acc, b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "/api/ru/spb1/owner/app/svc/42/mod/func";

    /// The parser before the one-pass rewrite (split on `?` and `/`, then each segment):
    /// slower, and plainly right; the rewrite must agree with it on every input.
    pub(super) fn reference(path: &str) -> Result<ApiPath<'_>, PathError> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let rest = path.strip_prefix("/api/").ok_or(PathError::NotApi)?;
        let mut segs = [""; SEGMENTS];
        let mut starts = [0usize; SEGMENTS];
        let (mut n, mut offset) = (0, 0);
        for seg in rest.split('/') {
            if n == SEGMENTS {
                return Err(PathError::BadPath);
            }
            (segs[n], starts[n]) = (seg, offset);
            offset += seg.len() + 1;
            n += 1;
        }
        if n != SEGMENTS {
            return Err(PathError::BadPath);
        }
        let valid = |seg: &str| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
        };
        for (i, seg) in segs.iter().enumerate() {
            if !(if i == WSID {
                !seg.is_empty()
            } else {
                valid(seg)
            }) {
                return Err(PathError::BadPath);
            }
        }
        let wsid = parse_wsid(segs[WSID]).ok_or(PathError::BadWsid)?;
        Ok(ApiPath {
            region: segs[0],
            cluster: segs[1],
            owner: segs[OWNER],
            app: segs[APP],
            app_name: &rest[starts[OWNER]..starts[APP] + segs[APP].len()],
            service: segs[4],
            wsid,
            module: segs[6],
            function: segs[7],
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]
        /// Paths built from the characters that matter to the parser (separators, dots,
        /// digits, a reserved character, a non-ASCII one) and arbitrary strings.
        #[test]
        fn agrees_with_the_reference(
            path in "(/api/)?[a-c0-9./?%~ö-]{0,40}",
            any in "\\PC{0,60}",
        ) {
            proptest::prop_assert_eq!(parse_api_path(&path), reference(&path));
            proptest::prop_assert_eq!(parse_api_path(&any), reference(&any));
            let api = format!("/api/{any}");
            proptest::prop_assert_eq!(parse_api_path(&api), reference(&api));
        }

        /// Paths of about eight generated segments (most of them well-formed) parse the same
        /// way too.
        #[test]
        fn agrees_on_eight_segments(
            segs in proptest::collection::vec("[a-c0-9.~_-]{1,3}|[a-c0-9.~_?%ö/ -]{0,4}", 7..=9),
        ) {
            let path = format!("/api/{}", segs.join("/"));
            proptest::prop_assert_eq!(parse_api_path(&path), reference(&path));
        }
    }

    #[test]
    fn parses_good_path() {
        let p = parse_api_path(GOOD).expect("good path");
        assert_eq!(
            p,
            ApiPath {
                region: "ru",
                cluster: "spb1",
                owner: "owner",
                app: "app",
                app_name: "owner/app",
                service: "svc",
                wsid: 42,
                module: "mod",
                function: "func",
            }
        );
    }

    #[test]
    fn app_name_is_a_slice_of_the_input() {
        let input = String::from("/api/r/c/my-org/my.app_1~x/s/0/m/f");
        let p = parse_api_path(&input).expect("good path");
        assert_eq!(p.app_name, "my-org/my.app_1~x");
        let start = p.app_name.as_ptr() as usize - input.as_ptr() as usize;
        assert_eq!(&input[start..start + p.app_name.len()], p.app_name);
        assert_eq!(start, "/api/r/c/".len());
    }

    #[test]
    fn query_string_ignored() {
        let p = parse_api_path("/api/ru/spb1/o/a/s/7/m/f?x=1&y=/a/b").expect("good path");
        assert_eq!(p.function, "f");
        assert_eq!(p.wsid, 7);
        assert_eq!(
            parse_api_path("/api/ru/spb1/o/a/s/7/m/f?").map(|p| p.function),
            Ok("f")
        );
    }

    #[test]
    fn wsid_bounds() {
        let max = parse_api_path("/api/r/c/o/a/s/18446744073709551615/m/f").map(|p| p.wsid);
        assert_eq!(max, Ok(u64::MAX));
        let zero = parse_api_path("/api/r/c/o/a/s/000/m/f").map(|p| p.wsid);
        assert_eq!(zero, Ok(0));
    }

    #[test]
    fn not_api() {
        for path in [
            "/",
            "",
            "/api",
            "/api?x=/api/",
            "/apix/r/c/o/a/s/1/m/f",
            "api/r/c/o/a/s/1/m/f",
            "/API/r/c/o/a/s/1/m/f",
        ] {
            assert_eq!(parse_api_path(path), Err(PathError::NotApi), "{path}");
        }
    }

    #[test]
    fn bad_paths() {
        for path in [
            "/api/",
            "/api/r/c/o/a/s/1/m",         // too few
            "/api/r/c/o/a/s/1/m/f/extra", // too many
            "/api/r/c/o/a/s/1/m/f/",      // trailing slash
            "/api/r/c/o//s/1/m/f",        // empty segment
            "/api//c/o/a/s/1/m/f",        // empty first segment
            "/api/r/c/o/a/s//m/f",        // empty wsid
            "/api/r/c/o/../s/1/m/f",      // dot-dot
            "/api/r/c/o/./s/1/m/f",       // dot
            "/api/r/c/o/a%2Fb/s/1/m/f",   // percent-encoded
            "/api/r/c/o/a b/s/1/m/f",     // space
            "/api/r/c/o/a/s/1/m/f#frag",  // fragment
            "/api/r/c/ö/a/s/1/m/f",       // non-ASCII
            "/api/r/c/o/a/s/1/m/f;p",     // reserved char
        ] {
            assert_eq!(parse_api_path(path), Err(PathError::BadPath), "{path}");
        }
    }

    #[test]
    fn bad_wsid() {
        for wsid in [
            "18446744073709551616",
            "99999999999999999999999",
            "-1",
            "+1",
            "1a",
            "0x10",
            "1.0",
            "~1",
        ] {
            let path = format!("/api/r/c/o/a/s/{wsid}/m/f");
            assert_eq!(parse_api_path(&path), Err(PathError::BadWsid), "{path}");
        }
    }

    #[test]
    fn bad_path_reported_before_bad_wsid() {
        assert_eq!(
            parse_api_path("/api/r/c/o/a%20/s/x/m/f"),
            Err(PathError::BadPath)
        );
    }

    #[test]
    fn error_codes_and_statuses() {
        assert_eq!(PathError::NotApi.code(), "not_found");
        assert_eq!(PathError::NotApi.http_status(), 404);
        assert_eq!(PathError::BadPath.code(), "bad_path");
        assert_eq!(PathError::BadPath.http_status(), 400);
        assert_eq!(PathError::BadWsid.code(), "bad_wsid");
        assert_eq!(PathError::BadWsid.http_status(), 400);
    }
}
