//! The AWS helpers every Ember crate shares: client construction, the classification of SDK
//! errors, and the service limits, each named once.
//!
//! Each caller maps a [`Failure`] to its own error type (a queue's, a store's, a loader's),
//! adding only the codes particular to its service (`NoSuchBucket`, `QueueDoesNotExist`...).

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// Largest SQS message body (the limit since 2025; moto enforces the same).
pub const SQS_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// An S3 client for an SDK config, with path-style addressing when an endpoint is set: local
/// S3-compatible servers (moto, SeaweedFS) serve buckets as paths, not host names.
pub fn s3_client(sdk: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::from(sdk).force_path_style(sdk.endpoint_url().is_some()).build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// What kind of failure an SDK error is, which decides whether to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request did not complete: timeout, connection refused or reset, unreadable answer.
    Transport,
    /// The service asked to slow down (or answered 429/503): retry with backoff.
    Throttled,
    /// Credentials missing, wrong, expired, or not allowed: retrying will not help.
    Auth,
    /// The service refused the request as invalid (a 4xx not covered above).
    Invalid,
    /// The service failed (5xx): may pass on retry.
    Service,
    /// The SDK could not build the request (a missing region, say): a configuration error.
    Construction,
}

impl FailureKind {
    /// Whether the same request could succeed later.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Transport | Self::Throttled | Self::Service)
    }
}

/// An SDK error, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// The service's error code (`NoSuchBucket`, `AWS.SimpleQueueService.NonExistentQueue`),
    /// empty when the request got no answer.
    pub code: String,
    /// The service's message, or the SDK's account of what failed.
    pub message: String,
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
}

impl Failure {
    /// The code without a query-protocol prefix (`AWS.SimpleQueueService.NonExistentQueue` is
    /// `NonExistentQueue`).
    pub fn short_code(&self) -> &str {
        self.code.rsplit('.').next().unwrap_or(&self.code)
    }

    /// `code: message`, or the message alone.
    pub fn describe(&self) -> String {
        if self.code.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.code, self.message)
        }
    }
}

/// Error codes that mean "slow down", across S3, SQS, ECS, Lambda and KMS.
const THROTTLING: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "OverLimit",
    "KmsThrottled",
];

/// Error codes that mean the credentials or permissions are wrong.
const AUTH: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "InvalidSecurity",
    "MissingAuthenticationToken",
    "ExpiredToken",
    "ExpiredTokenException",
];

/// The kind of a service's answer by its error code and HTTP status (a batch request's
/// failed entries carry these without an `SdkError`).
pub fn kind_of(code: &str, status: Option<u16>) -> FailureKind {
    let short = code.rsplit('.').next().unwrap_or(code);
    if THROTTLING.contains(&short) || matches!(status, Some(429 | 503)) {
        FailureKind::Throttled
    } else if AUTH.contains(&short) {
        FailureKind::Auth
    } else if short == "RequestTimeout" {
        FailureKind::Transport
    } else if status.is_some_and(|s| (400..500).contains(&s)) {
        FailureKind::Invalid
    } else {
        FailureKind::Service
    }
}

/// Classifies any SDK error (`SdkError` is the same type in every SDK crate: S3's re-export
/// names it for SQS, ECS and Lambda errors too).
pub fn classify<E>(err: &SdkError<E>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let context = || DisplayErrorContext(err).to_string();
    match err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or_default().to_string();
            let message = service.err().message().map_or_else(context, str::to_string);
            let status = Some(service.raw().status().as_u16());
            Failure { kind: kind_of(&code, status), code, message, status }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Failure { kind: FailureKind::Transport, code: String::new(), message: context(), status: None }
        }
        _ => Failure { kind: FailureKind::Construction, code: String::new(), message: context(), status: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_protocol_codes_lose_their_prefix() {
        let f = Failure {
            kind: FailureKind::Invalid,
            code: "AWS.SimpleQueueService.NonExistentQueue".into(),
            message: "no queue".into(),
            status: Some(400),
        };
        assert_eq!(f.short_code(), "NonExistentQueue");
        assert_eq!(f.describe(), "AWS.SimpleQueueService.NonExistentQueue: no queue");
        assert!(!f.kind.is_retryable());
        assert!(FailureKind::Throttled.is_retryable() && FailureKind::Transport.is_retryable());
    }
}
