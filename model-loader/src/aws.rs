//! The AWS helpers every Ember crate shares: client construction, the classification of SDK
//! errors, and the service limits, each named once.
//!
//! Each caller maps a [`Failure`] to its own error type (a queue's, a store's, a loader's),
//! adding only the codes particular to its service (`NoSuchBucket`, `QueueDoesNotExist`...).

use std::fmt;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

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

/// The code [`classify`] gives a request that found no credentials at all (not a service
/// code: the request never left the machine).
pub const NO_CREDENTIALS: &str = "NoCredentials";

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
/// names it for SQS, ECS and Lambda errors too). The message is the chain of causes, never
/// the SDK's debug dump; a request that found no credentials is [`NO_CREDENTIALS`].
pub fn classify<E>(err: &SdkError<E>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let Some(creds) = credentials_error(err) {
        let (code, message) = match creds {
            CredentialsError::CredentialsNotLoaded(_) => (NO_CREDENTIALS, "no AWS credentials were found".to_string()),
            other => ("CredentialsError", causes(other)),
        };
        return Failure { kind: FailureKind::Auth, code: code.into(), message, status: None };
    }
    match err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or_default().to_string();
            let status = Some(service.raw().status().as_u16());
            let message = match service.err().message() {
                Some(m) if !m.is_empty() => m.to_string(),
                // A HEAD answer has no body: the status is all there is.
                _ => format!("HTTP {}", service.raw().status().as_u16()),
            };
            Failure { kind: kind_of(&code, status), code, message, status }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Failure { kind: FailureKind::Transport, code: String::new(), message: causes(err), status: None }
        }
        _ => Failure { kind: FailureKind::Construction, code: String::new(), message: causes(err), status: None },
    }
}

/// The credentials provider's error, when that is why the request failed.
fn credentials_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a CredentialsError> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(creds) = e.downcast_ref::<CredentialsError>() {
            return Some(creds);
        }
        next = e.source();
    }
    None
}

/// An error and its causes, `: `-separated, each said once (the SDK's wrappers often repeat
/// their source's text).
pub fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// An AWS request that failed: which request, on which resource, what the service (or the
/// SDK) said, and what to check. Every Ember error about AWS reads through this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsError {
    /// The API operation (`HeadBucket`, `GetQueueUrl`).
    pub op: &'static str,
    /// What it was asked of, as a user names it (`S3 bucket \`results\``, `SQS queue \`jobs\``).
    pub resource: String,
    pub failure: Failure,
}

impl AwsError {
    pub fn new<E>(op: &'static str, resource: impl Into<String>, err: &SdkError<E>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        Self { op, resource: resource.into(), failure: classify(err) }
    }

    pub fn is_retryable(&self) -> bool {
        self.failure.kind.is_retryable()
    }

    /// What a user should check, by what failed.
    pub fn hint(&self) -> String {
        match self.failure.short_code() {
            NO_CREDENTIALS => "set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                               (and AWS_ENDPOINT_URL for a local server such as moto)"
                .into(),
            "NoSuchBucket" => {
                "check the bucket name, and that it exists in this account and region (AWS_REGION)".into()
            }
            "NonExistentQueue" | "QueueDoesNotExist" => {
                "check the queue name and the region (AWS_REGION), or create it (--create-queues for development)"
                    .into()
            }
            _ => match self.failure.kind {
                FailureKind::Auth => format!(
                    "check that the credentials (AWS_PROFILE or AWS_ACCESS_KEY_ID) are valid and allowed {} on {}",
                    self.op, self.resource
                ),
                FailureKind::Transport => {
                    "check the network, the region (AWS_REGION) and the endpoint (AWS_ENDPOINT_URL)".into()
                }
                FailureKind::Throttled => {
                    "AWS asked to slow down: it is retried; lower the request rate if it lasts".into()
                }
                FailureKind::Service => {
                    "AWS failed to answer: it is retried; check the AWS Health Dashboard if it lasts".into()
                }
                FailureKind::Invalid => format!("check the name of {} and the options given", self.resource),
                FailureKind::Construction => "check the region (AWS_REGION) and the endpoint (AWS_ENDPOINT_URL)".into(),
            },
        }
    }
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {} failed: {}; {}", self.op, self.resource, self.failure.describe(), self.hint())
    }
}

impl std::error::Error for AwsError {}

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
