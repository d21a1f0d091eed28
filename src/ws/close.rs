//! Why a WebSocket connection ends, and the close frame each cause sends:
//! every close code Herald sends is here, and only here.

use actix_http::ws::{CloseCode, CloseReason};

use super::socket::WsError;
use crate::protocol::TOKEN_EXPIRED;

/// Why a connection ends.
#[derive(Debug)]
pub enum CloseCause {
    /// The client sent a close frame: its code is echoed (RFC 6455 §5.5.1),
    /// 1000 when it named none.
    ClientClosed(Option<CloseReason>),
    /// The client went away (reading or writing failed): no close frame.
    ClientGone,
    /// A write waited `server.write_timeout` for a client that reads
    /// nothing: cut off without a close frame, which could not reach it.
    Stalled,
    /// The client broke the WebSocket protocol (1002), sent text that is
    /// not UTF-8 (1007), a message over the limit (1009), or frames over
    /// their budget (1008, naming the setting).
    Unreadable(WsError),
    /// The node shuts down (1001).
    GoingAway,
    /// The mailbox overflowed: a slow consumer (1013, try again later).
    SlowConsumer,
    /// No pong within `server.heartbeat_timeout` (1008).
    HeartbeatTimeout,
    /// Refused by a rate limit too often in a row (1008); names the
    /// setting.
    RateLimited(&'static str),
    /// The event store failed mid-replay (1011): resume from the last
    /// event received.
    ReplayFailed,
    /// The token's `exp` passed (4001).
    TokenExpired,
}

impl CloseCause {
    /// The close frame owed to the client; none when it cannot get one.
    pub fn reason(&self) -> Option<CloseReason> {
        let (code, description) = match self {
            CloseCause::ClientClosed(theirs) => {
                return Some(theirs.clone().unwrap_or_else(|| CloseCode::Normal.into()));
            }
            CloseCause::ClientGone | CloseCause::Stalled => return None,
            CloseCause::Unreadable(WsError::TooBig) => (CloseCode::Size, "message too big"),
            CloseCause::Unreadable(WsError::InvalidUtf8) => {
                (CloseCode::Invalid, "text frame is not valid UTF-8")
            }
            CloseCause::Unreadable(WsError::Protocol(_)) => {
                (CloseCode::Protocol, "WebSocket protocol error")
            }
            CloseCause::Unreadable(WsError::Io(_)) => return None,
            CloseCause::Unreadable(WsError::OverBudget(setting)) => {
                return Some(CloseReason {
                    code: CloseCode::Policy,
                    description: Some(format!("frames over {setting}")),
                });
            }
            CloseCause::GoingAway => (CloseCode::Away, "server shutting down"),
            CloseCause::SlowConsumer => (CloseCode::Again, "slow consumer: outbound queue full"),
            CloseCause::HeartbeatTimeout => (CloseCode::Policy, "heartbeat timeout: no pong"),
            CloseCause::RateLimited(setting) => {
                let description = format!("{setting} rate limit exceeded repeatedly");
                return Some(CloseReason {
                    code: CloseCode::Policy,
                    description: Some(description),
                });
            }
            CloseCause::ReplayFailed => (
                CloseCode::Error,
                "replay failed: event store unavailable; reconnect and resume",
            ),
            CloseCause::TokenExpired => (CloseCode::Other(TOKEN_EXPIRED), "token expired"),
        };
        Some(CloseReason {
            code,
            description: Some(description.to_owned()),
        })
    }

    /// Every close code a node sends, read from [`reason`](Self::reason)
    /// over one cause of each kind (docs/protocol.md lists each; a test
    /// checks).
    pub fn codes() -> Vec<u16> {
        let every = [
            CloseCause::ClientClosed(None),
            CloseCause::ClientGone,
            CloseCause::Stalled,
            CloseCause::Unreadable(WsError::TooBig),
            CloseCause::Unreadable(WsError::InvalidUtf8),
            CloseCause::Unreadable(WsError::Protocol(String::new())),
            CloseCause::Unreadable(WsError::OverBudget("")),
            CloseCause::GoingAway,
            CloseCause::SlowConsumer,
            CloseCause::HeartbeatTimeout,
            CloseCause::RateLimited(""),
            CloseCause::ReplayFailed,
            CloseCause::TokenExpired,
        ];
        // A cause added without its place above fails to compile here.
        for cause in &every {
            match cause {
                CloseCause::ClientClosed(_)
                | CloseCause::ClientGone
                | CloseCause::Stalled
                | CloseCause::Unreadable(_)
                | CloseCause::GoingAway
                | CloseCause::SlowConsumer
                | CloseCause::HeartbeatTimeout
                | CloseCause::RateLimited(_)
                | CloseCause::ReplayFailed
                | CloseCause::TokenExpired => {}
            }
        }
        let mut codes: Vec<u16> = every
            .iter()
            .filter_map(CloseCause::reason)
            .map(|r| r.code.into())
            .collect();
        codes.sort_unstable();
        codes.dedup();
        codes
    }
}
