//! Why a request body could not be read, with the problem each reason is answered with.

use super::problem::{Problem, kinds};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is larger than the route allows")]
    TooLarge,
    #[error("the request body did not arrive in time")]
    Timeout,
    #[error("reading the request body failed: {0}")]
    Unreadable(String),
}

impl BodyError {
    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            BodyError::TooLarge => "body_too_large",
            BodyError::Timeout => "body_timeout",
            BodyError::Unreadable(_) => "body_unreadable",
        }
    }

    pub fn problem(&self, route: &str) -> Problem {
        match self {
            BodyError::TooLarge => {
                Problem::new(kinds::BODY_TOO_LARGE, format!("the request body exceeds the limit of route {route}"))
            }
            BodyError::Timeout => {
                Problem::new(kinds::BODY_TIMEOUT, "the request body did not arrive in time").close_connection()
            }
            BodyError::Unreadable(_) => {
                Problem::new(kinds::BODY_UNREADABLE, "the request body ended early or could not be read")
            }
        }
    }
}

/// The error for a request body that could not be read: too large, too slow, or broken.
pub fn body_error(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BodyError {
    let error = error.into();
    if is_length_limit(error.as_ref()) {
        BodyError::TooLarge
    } else if super::inbound::is_body_timeout(error.as_ref()) {
        BodyError::Timeout
    } else {
        BodyError::Unreadable(error.to_string())
    }
}

/// Whether a body limit ended the read, anywhere in the error's chain.
pub fn is_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        current = e.source();
    }
    false
}
