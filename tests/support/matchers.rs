//! Named predicates over server frames, so that waits read like the
//! protocol: `watcher.expect_event(online("alice"))`.

use std::fmt;

use serde_json::Value;

/// A predicate over one JSON frame, with a description for failure messages.
pub struct Matcher {
    description: String,
    predicate: Box<dyn Fn(&Value) -> bool + Send + Sync>,
}

impl Matcher {
    pub fn new(
        description: impl Into<String>,
        predicate: impl Fn(&Value) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            description: description.into(),
            predicate: Box::new(predicate),
        }
    }

    pub fn matches(&self, frame: &Value) -> bool {
        (self.predicate)(frame)
    }

    /// Either of two matchers.
    pub fn or(self, other: Matcher) -> Matcher {
        let description = format!("{} or {}", self.description, other.description);
        Matcher::new(description, move |frame| {
            self.matches(frame) || other.matches(frame)
        })
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

fn frame_type(frame: &Value) -> &str {
    frame["type"].as_str().unwrap_or("")
}

/// `{"type":"online","user":USER,...}`
pub fn online(user: &str) -> Matcher {
    let user = user.to_owned();
    Matcher::new(format!("online of {user}"), move |frame| {
        frame_type(frame) == "online" && frame["user"] == user.as_str()
    })
}

/// `{"type":"offline","user":USER,...}`
pub fn offline(user: &str) -> Matcher {
    let user = user.to_owned();
    Matcher::new(format!("offline of {user}"), move |frame| {
        frame_type(frame) == "offline" && frame["user"] == user.as_str()
    })
}

/// Any `online` or `offline` of `user`.
pub fn presence_of(user: &str) -> Matcher {
    online(user).or(offline(user))
}

/// Any `online` or `offline` event at all.
pub fn any_presence_event() -> Matcher {
    Matcher::new("any online/offline event", |frame| {
        matches!(frame_type(frame), "online" | "offline")
    })
}

/// `{"type":"joined","room":ROOM,"user":USER}`
pub fn joined(room: &str, user: &str) -> Matcher {
    let (room, user) = (room.to_owned(), user.to_owned());
    Matcher::new(format!("joined of {user} in {room}"), move |frame| {
        frame_type(frame) == "joined" && frame["room"] == room.as_str() && frame["user"] == user
    })
}

/// `{"type":"left","room":ROOM,"user":USER}`
pub fn left(room: &str, user: &str) -> Matcher {
    let (room, user) = (room.to_owned(), user.to_owned());
    Matcher::new(format!("left of {user} in {room}"), move |frame| {
        frame_type(frame) == "left" && frame["room"] == room.as_str() && frame["user"] == user
    })
}

/// Any `joined` or `left` in `room`.
pub fn room_event_in(room: &str) -> Matcher {
    let room = room.to_owned();
    Matcher::new(format!("any joined/left in {room}"), move |frame| {
        matches!(frame_type(frame), "joined" | "left") && frame["room"] == room.as_str()
    })
}

/// Any frame whatsoever.
pub fn any_frame() -> Matcher {
    Matcher::new("any frame", |_| true)
}

/// `{"type":"offline","user":USER,"reason":REASON,...}`
pub fn offline_because(user: &str, reason: &str) -> Matcher {
    let (user, reason) = (user.to_owned(), reason.to_owned());
    Matcher::new(format!("offline of {user} ({reason})"), move |frame| {
        frame_type(frame) == "offline"
            && frame["user"] == user.as_str()
            && frame["reason"] == reason.as_str()
    })
}

/// `{"type":"left","room":ROOM,"user":USER,"reason":REASON}`
pub fn left_because(room: &str, user: &str, reason: &str) -> Matcher {
    let (room, user, reason) = (room.to_owned(), user.to_owned(), reason.to_owned());
    Matcher::new(
        format!("left of {user} in {room} ({reason})"),
        move |frame| {
            frame_type(frame) == "left"
                && frame["room"] == room.as_str()
                && frame["user"] == user.as_str()
                && frame["reason"] == reason.as_str()
        },
    )
}

/// Any `joined` or `left` in any room.
pub fn any_room_event() -> Matcher {
    Matcher::new("any joined/left event", |frame| {
        matches!(frame_type(frame), "joined" | "left")
    })
}

/// Any presence or room event: `online`, `offline`, `joined`, `left`.
pub fn any_event() -> Matcher {
    any_presence_event().or(any_room_event())
}
