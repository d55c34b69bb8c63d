//! What a handler answers.

use bytes::Bytes;
use fedbus_proto::link::RequestHead;

/// What a handler answers: a response for the client, or a redirect of the same request to
/// another role (docs/REDIRECT.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The answer for the client.
    Response {
        /// HTTP status, 200..599 (anything else, 1xx included, reaches the client as
        /// `502 bad_task_status`: a task cannot send an interim or a made-up status).
        status: u16,
        /// Extra header lines `name: value`. The router drops framing headers, `fedbus-*`
        /// and lines with CR or LF.
        headers: Vec<(String, String)>,
        /// Content type of `body` (none: `application/octet-stream`).
        content_type: Option<String>,
        /// The body.
        body: Bytes,
    },
    /// Send the same request to a task of `role`, on `partition` (None: the same partition).
    Redirect {
        /// Target role; must not be empty.
        role: String,
        /// Target partition.
        partition: Option<u32>,
    },
}

impl Outcome {
    /// 200 with `body`.
    pub fn ok(body: impl Into<Bytes>) -> Outcome {
        Outcome::status(200, body)
    }

    /// `status` with `body`.
    pub fn status(status: u16, body: impl Into<Bytes>) -> Outcome {
        Outcome::Response {
            status,
            headers: Vec::new(),
            content_type: None,
            body: body.into(),
        }
    }

    /// `status` with a JSON body.
    pub fn json(status: u16, value: &serde_json::Value) -> Outcome {
        Outcome::status(status, value.to_string()).with_content_type(Some("application/json"))
    }

    /// Redirect to `role`, same partition.
    pub fn redirect(role: impl Into<String>) -> Outcome {
        Outcome::Redirect {
            role: role.into(),
            partition: None,
        }
    }

    /// Redirect to `role` on `partition`.
    pub fn redirect_to(role: impl Into<String>, partition: u32) -> Outcome {
        Outcome::Redirect {
            role: role.into(),
            partition: Some(partition),
        }
    }

    /// Sets the content type of a response (no effect on a redirect).
    pub fn with_content_type<S: Into<String>>(mut self, ct: Option<S>) -> Outcome {
        if let Outcome::Response { content_type, .. } = &mut self {
            *content_type = ct.map(Into::into);
        }
        self
    }

    /// Adds a header line to a response (no effect on a redirect).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Outcome {
        if let Outcome::Response { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }

    /// The whole frame answering `head`.
    pub(crate) fn encode(&self, head: &RequestHead) -> Bytes {
        match self {
            Outcome::Response {
                status,
                headers,
                content_type,
                body,
            } => head.response(*status, headers, content_type.as_deref(), body),
            Outcome::Redirect { role, partition } => head.redirect(role, *partition),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedbus_proto::{tag, Frame, Kind};

    #[test]
    fn outcomes_encode() {
        let head = RequestHead {
            request_id: 9,
            partition: 4,
            hops: 1,
        };
        let o = Outcome::json(201, &serde_json::json!({"a": 1})).with_header("x-y", "z");
        let f = Frame::decode(o.encode(&head)).unwrap();
        assert_eq!(f.header.kind, Kind::Response);
        assert_eq!(f.header.request_id, 9);
        assert_eq!(f.get_u64(tag::STATUS), Some(201));
        assert_eq!(f.get_str(tag::HEADER), Some("x-y: z"));
        assert_eq!(f.get_str(tag::CONTENT_TYPE), Some("application/json"));
        assert_eq!(&f.payload[..], br#"{"a":1}"#);

        let r = Outcome::redirect_to("auth", 2).with_header("ignored", "x");
        let f = Frame::decode(r.encode(&head)).unwrap();
        assert_eq!(f.header.kind, Kind::Redirect);
        assert_eq!(f.get_str(tag::ROLE), Some("auth"));
        assert_eq!(f.get_u64(tag::PARTITION), Some(2));
        assert_eq!(f.get(tag::HEADER), None);
    }
}
