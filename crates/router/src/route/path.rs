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
pub fn parse_api_path(path: &str) -> Result<ApiPath<'_>, PathError> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let rest = path.strip_prefix("/api/").ok_or(PathError::NotApi)?;

    // A fixed array, not a Vec: no allocation on the hot path.
    let mut segs = [""; SEGMENTS];
    let mut starts = [0usize; SEGMENTS];
    let mut n = 0;
    let mut offset = 0;
    for seg in rest.split('/') {
        if n == SEGMENTS {
            return Err(PathError::BadPath);
        }
        segs[n] = seg;
        starts[n] = offset;
        offset += seg.len() + 1;
        n += 1;
    }
    if n != SEGMENTS {
        return Err(PathError::BadPath);
    }
    for (i, seg) in segs.iter().enumerate() {
        let ok = if i == WSID {
            !seg.is_empty()
        } else {
            valid_segment(seg)
        };
        if !ok {
            return Err(PathError::BadPath);
        }
    }
    let wsid = parse_wsid(segs[WSID]).ok_or(PathError::BadWsid)?;
    let app_name = &rest[starts[OWNER]..starts[APP] + segs[APP].len()];

    Ok(ApiPath {
        region: segs[0],
        cluster: segs[1],
        owner: segs[OWNER],
        app: segs[APP],
        app_name,
        service: segs[4],
        wsid,
        module: segs[6],
        function: segs[7],
    })
}

/// Non-empty, unreserved characters of RFC 3986 only, and not a dot segment (which a client or
/// proxy may normalize away, changing the target).
fn valid_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

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
