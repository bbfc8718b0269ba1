//! Worker labels as the API accepts them (enrolment, `PUT /labels`).

use std::collections::BTreeMap;

use super::message::ApiError;

/// At most `protocol::MAX_LABELS` labels; keys 1..=32 bytes, values ≤ 64.
pub(crate) fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > protocol::MAX_LABELS {
        return Err(ApiError::new(
            400,
            format!("at most {} labels", protocol::MAX_LABELS),
        ));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > 32 || v.len() > 64 {
            return Err(ApiError::new(
                400,
                "label keys 1..=32 bytes, values ≤ 64 bytes",
            ));
        }
    }
    Ok(())
}
