//! `renew`: a fresh credential on an open link (PROTOCOL.md sections 4 and 10). A task sends
//! its router a new service token, a dialing router its peer a new peer token:
//! `{"type":"renew","token":"..."}`; the answer is `{"type":"renewed","exp":N}` or
//! `{"type":"renew_refused","error":"...","message":"..."}`. Shared by the router (both ends)
//! and the SDK, so the two sides read one set of messages and one spacing rule.

use serde::Deserialize;
use std::time::{Duration, Instant};

/// The receiver's rule: a second `renew` within this of the last one it verified is refused
/// `too_often`, a third closes the link (1008).
pub const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);

/// The sender's spacing, from the answer to its last `renew` to the next one. Counted from the
/// answer, not from the send: a renew that waited in a stalled outbox and a later one would
/// otherwise arrive together. The margin over [`MIN_RENEW_INTERVAL`] covers timer slack.
pub const RENEW_SPACING: Duration = Duration::from_millis(1100);

/// How often a sender looks for a newer credential to send. Well below [`RENEW_SPACING`]: a
/// sender that looked only every `RENEW_SPACING` would find the pacer still closed by the time
/// the answer took, and send every second look (every 2.2 s, which let a peer link on 4 s
/// tokens rewritten every 1.5 s reach its token's expiry).
pub const SENDER_POLL: Duration = Duration::from_millis(200);

/// A refused `renew` (a token of a key version the receiver does not know yet, during a
/// rotation done out of order) is sent again this long after the refusal, until one is
/// accepted or the link ends: the receiver's reload lets it through before the old version's
/// grace ends.
pub const REFUSED_RETRY: Duration = Duration::from_secs(5);

/// A `renew` unanswered this long (a peer that predates renewals ignores it) no longer holds
/// back the next one.
pub const RENEW_ANSWER_WAIT: Duration = Duration::from_secs(10);

// The sender's spacing must exceed the receiver's interval, and the wait for an answer the
// spacing: checked when the crate compiles.
const _: () = assert!(RENEW_SPACING.as_millis() > MIN_RENEW_INTERVAL.as_millis());
const _: () = assert!(RENEW_ANSWER_WAIT.as_millis() > RENEW_SPACING.as_millis());
const _: () = assert!(SENDER_POLL.as_millis() * 4 <= RENEW_SPACING.as_millis());

/// The `renew` message carrying `token`.
pub fn renew(token: &str) -> String {
    serde_json::json!({"type": "renew", "token": token}).to_string()
}

/// The acceptance of a `renew`: the link now lives until `exp` (unix seconds).
pub fn renewed(exp: u64) -> String {
    serde_json::json!({"type": "renewed", "exp": exp}).to_string()
}

/// The refusal of a `renew`, with the error code a refused upgrade would get: the link lives
/// until its current credential expires.
pub fn renew_refused(error: &str, message: &str) -> String {
    serde_json::json!({"type": "renew_refused", "error": error, "message": message}).to_string()
}

/// `{"type":"draining"}`: the task is stopping (PROTOCOL.md section 4). It answers the requests
/// it holds; the router sends it no new one on that link. Here with `renew`, the other text
/// message a task sends on a registered link.
pub const DRAINING: &str = r#"{"type":"draining"}"#;

/// True for a [`DRAINING`] message (any JSON object whose `type` is `draining`).
pub fn is_draining(text: &[u8]) -> bool {
    has_type(text, "draining")
}

/// `{"type":"drained"}`: the router's answer to [`DRAINING`], sent on the link once it took the
/// link out of routing. A link delivers in order, so every request the router routed to the
/// link came before it: a task that read it and answered what it holds may close the link
/// without losing a request.
pub const DRAINED: &str = r#"{"type":"drained"}"#;

/// True for a [`DRAINED`] message (any JSON object whose `type` is `drained`).
pub fn is_drained(text: &[u8]) -> bool {
    has_type(text, "drained")
}

/// `{"type":"router_draining"}`: the router itself is draining (SIGTERM; PROTOCOL.md section 4,
/// "A router that drains"). Sent on every registered task link once the shard's internal
/// listeners are closed, so that a dial to the same address reaches the router that took the
/// address over (`fedbus run --takeover`), or fails while none has. The link still carries
/// what the router routes to it until the router closes it (1001) at the end of its drain: the
/// task serves it as before and opens a new link to the same address now, instead of after the
/// close.
pub const ROUTER_DRAINING: &str = r#"{"type":"router_draining"}"#;

/// True for a [`ROUTER_DRAINING`] message (any JSON object whose `type` is `router_draining`).
pub fn is_router_draining(text: &[u8]) -> bool {
    has_type(text, "router_draining")
}

/// True for a JSON object whose `type` is `kind`.
fn has_type(text: &[u8], kind: &str) -> bool {
    serde_json::from_slice::<TaskText>(text).is_ok_and(|m| m.kind == kind)
}

/// A task's text message on a registered link: its type, and a `renew`'s token.
#[derive(Deserialize)]
struct TaskText {
    #[serde(rename = "type")]
    kind: String,
    /// Not a string (or absent): read as an empty token, so refused `missing_token`.
    #[serde(default)]
    token: serde_json::Value,
}

/// The token of a `renew` text message; None for any other text.
pub fn renew_token(text: &[u8]) -> Option<String> {
    let r = serde_json::from_slice::<TaskText>(text).ok()?;
    (r.kind == "renew").then(|| r.token.as_str().unwrap_or_default().to_string())
}

/// The answer to a `renew`, as its sender reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewAnswer {
    /// Accepted; the new expiry when the message carries one.
    Renewed {
        /// Unix seconds.
        exp: Option<u64>,
    },
    /// Refused; the link lives until its current credential expires.
    Refused {
        /// Error code (`expired_token`, `too_often`, ...).
        error: String,
        /// Human-readable reason.
        message: String,
    },
}

#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
}

/// Reads `text` as the answer to a `renew`; None for any other text.
pub fn renew_answer(text: &[u8]) -> Option<RenewAnswer> {
    let a = serde_json::from_slice::<Answer>(text).ok()?;
    match a.kind.as_str() {
        "renewed" => Some(RenewAnswer::Renewed { exp: a.exp }),
        "renew_refused" => Some(RenewAnswer::Refused {
            error: a.error,
            message: a.message,
        }),
        _ => None,
    }
}

/// The sender's side of the spacing rule: one `renew` outstanding at a time, the next one
/// [`RENEW_SPACING`] after the answer to the last (or [`RENEW_ANSWER_WAIT`] after a send that
/// got none).
#[derive(Debug, Clone, Copy, Default)]
pub struct RenewPacer {
    /// When the last renew was sent.
    sent: Option<Instant>,
    /// Renews sent and not answered yet (more than one only after [`RENEW_ANSWER_WAIT`]).
    outstanding: u32,
    /// When the last answer arrived.
    answered: Option<Instant>,
}

impl RenewPacer {
    /// The earliest instant the next `renew` may be sent (`now` or later).
    pub fn earliest(&self, now: Instant) -> Instant {
        let Some(at) = self.sent else {
            return now;
        };
        let after = if self.outstanding > 0 {
            at + RENEW_ANSWER_WAIT
        } else {
            at.max(self.answered.unwrap_or(at)) + RENEW_SPACING
        };
        after.max(now)
    }

    /// True when a `renew` may be sent at `now`.
    pub fn may_send(&self, now: Instant) -> bool {
        self.earliest(now) <= now
    }

    /// A `renew` was sent at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.sent = Some(now);
        self.outstanding += 1;
    }

    /// An answer arrived at `now` (answers come in the order of the renews). False for one
    /// with none outstanding, which is ignored.
    pub fn answered(&mut self, now: Instant) -> bool {
        if self.outstanding == 0 {
            return false;
        }
        self.outstanding -= 1;
        self.answered = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_is_read_and_nothing_else_is() {
        assert!(is_draining(DRAINING.as_bytes()));
        assert!(is_draining(br#"{"type":"draining","why":"rollout"}"#));
        assert!(!is_draining(br#"{"type":"renew","token":"x"}"#));
        assert!(!is_draining(b"draining"));
        assert!(renew_token(DRAINING.as_bytes()).is_none());
        assert!(is_drained(DRAINED.as_bytes()));
        assert!(!is_drained(DRAINING.as_bytes()));
        assert!(!is_draining(DRAINED.as_bytes()));
        assert!(is_router_draining(ROUTER_DRAINING.as_bytes()));
        assert!(!is_router_draining(DRAINING.as_bytes()));
        assert!(!is_draining(ROUTER_DRAINING.as_bytes()));
        assert!(!is_drained(ROUTER_DRAINING.as_bytes()));
    }

    #[test]
    fn messages_round_trip() {
        assert_eq!(
            renew_token(renew("fbs1.x").as_bytes()).as_deref(),
            Some("fbs1.x")
        );
        assert_eq!(
            renew_token(br#"{"type":"renew","token":7}"#).as_deref(),
            Some("")
        );
        assert_eq!(renew_token(br#"{"type":"renew"}"#).as_deref(), Some(""));
        assert_eq!(renew_token(br#"{"type":"hello"}"#), None);
        assert_eq!(renew_token(b"not json"), None);
        assert_eq!(
            renew_answer(renewed(42).as_bytes()),
            Some(RenewAnswer::Renewed { exp: Some(42) })
        );
        assert_eq!(
            renew_answer(renew_refused("too_often", "slow down").as_bytes()),
            Some(RenewAnswer::Refused {
                error: "too_often".into(),
                message: "slow down".into()
            })
        );
        assert_eq!(renew_answer(br#"{"type":"status","ready":true}"#), None);
        assert_eq!(renew_answer(b"[1]"), None);
    }

    #[test]
    fn the_first_renew_goes_at_once() {
        let now = Instant::now();
        assert!(RenewPacer::default().may_send(now));
    }

    #[test]
    fn one_renew_is_outstanding_until_its_answer() {
        let t0 = Instant::now();
        let mut p = RenewPacer::default();
        p.sent(t0);
        // A stalled outbox: however long the answer takes (below the wait), no second renew.
        for s in [0, 1, 2, 5, 9] {
            assert!(!p.may_send(t0 + Duration::from_secs(s)), "{s} s");
        }
        // The answer after 3 s: the next one is spaced from the answer, not from the send.
        let a = t0 + Duration::from_secs(3);
        p.answered(a);
        assert!(!p.may_send(a + Duration::from_millis(1099)));
        assert!(p.may_send(a + RENEW_SPACING));
        assert_eq!(p.earliest(a), a + RENEW_SPACING);
    }

    #[test]
    fn an_unanswered_renew_stops_holding_back_after_the_wait() {
        let t0 = Instant::now();
        let mut p = RenewPacer::default();
        p.sent(t0);
        assert!(!p.may_send(t0 + RENEW_ANSWER_WAIT - Duration::from_millis(1)));
        assert!(p.may_send(t0 + RENEW_ANSWER_WAIT));
        // Two outstanding now: the late answer to the first does not open the gate for the
        // second; the gate opens a spacing after the second's answer.
        let t1 = t0 + RENEW_ANSWER_WAIT;
        p.sent(t1);
        assert!(p.answered(t1 + Duration::from_millis(10)));
        assert!(!p.may_send(t1 + Duration::from_secs(5)));
        assert!(p.answered(t1 + Duration::from_millis(20)));
        assert_eq!(
            p.earliest(t1),
            t1 + Duration::from_millis(20) + RENEW_SPACING
        );
        // An answer with none outstanding changes nothing (and says so).
        assert!(!p.answered(t1 + Duration::from_secs(3)));
        assert_eq!(
            p.earliest(t1),
            t1 + Duration::from_millis(20) + RENEW_SPACING
        );
    }
}
