//! What the decryption agent publishes: a decrypted result for the cockpit, or the refusal
//! of an inference on the dead-letter topic (never a decrypted value there).

use serde::{Deserialize, Serialize};

/// A decrypted result, JSON on `<cockpit_prefix>/<device>/<camera>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CockpitResult {
    pub device_id: String,
    pub camera_id: String,
    /// 32 hex digits.
    pub model_id: String,
    pub model_version: u32,
    /// With `sequence`, identifies the inference: a consumer that must see each result
    /// once deduplicates on (device_id, camera_id, epoch, sequence).
    pub epoch: u64,
    pub sequence: u64,
    pub label: usize,
    pub frame_timestamp_ms: u64,
    /// RFC 3339, UTC.
    pub frame_time: String,
    pub decrypt_ms: f64,
    /// Only for the models in the agent's `logits_for`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<i64>>,
}

/// Why an inference was refused: a stable code for programs (the dead letter's `code`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// Larger than `limits.max_payload_bytes`.
    Oversized,
    /// The topic is not `<edge_prefix>/<device>/<camera>/inference`.
    NotInferenceTopic,
    /// The envelope does not parse (bad magic, old schema, truncated, bad fields).
    MalformedEnvelope,
    /// The envelope names another device or camera than its topic.
    WrongSender,
    /// The model id is not in the database.
    UnknownModel,
    /// The model is in the database but cannot serve (its key is unusable or sealed).
    ModelUnusable,
    /// The envelope's model version is not the database's.
    WrongVersion,
    /// The encrypted output does not parse or conform.
    MalformedCiphertext,
    /// The encrypted output's layout is not the model's own.
    WrongLayout,
    /// A decrypted digit failed its padding check (another key, or forged).
    DecryptionCheck,
    /// Decrypted logits or label outside what the model can produce.
    ImpossibleValues,
    /// The agent could not encode its own result.
    Internal,
}

impl RefusalCode {
    /// The code as JSON writes it (`unknown_model`).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::Oversized => "oversized",
            RefusalCode::NotInferenceTopic => "not_inference_topic",
            RefusalCode::MalformedEnvelope => "malformed_envelope",
            RefusalCode::WrongSender => "wrong_sender",
            RefusalCode::UnknownModel => "unknown_model",
            RefusalCode::ModelUnusable => "model_unusable",
            RefusalCode::WrongVersion => "wrong_version",
            RefusalCode::MalformedCiphertext => "malformed_ciphertext",
            RefusalCode::WrongLayout => "wrong_layout",
            RefusalCode::DecryptionCheck => "decryption_check",
            RefusalCode::ImpossibleValues => "impossible_values",
            RefusalCode::Internal => "internal",
        }
    }

    /// Every code, for documents and tests that list them.
    pub const ALL: [RefusalCode; 12] = [
        RefusalCode::Oversized,
        RefusalCode::NotInferenceTopic,
        RefusalCode::MalformedEnvelope,
        RefusalCode::WrongSender,
        RefusalCode::UnknownModel,
        RefusalCode::ModelUnusable,
        RefusalCode::WrongVersion,
        RefusalCode::MalformedCiphertext,
        RefusalCode::WrongLayout,
        RefusalCode::DecryptionCheck,
        RefusalCode::ImpossibleValues,
        RefusalCode::Internal,
    ];
}

/// A refused inference, JSON on the dead-letter topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub code: RefusalCode,
    /// The refusal for people.
    pub reason: String,
    /// The topic the inference arrived on.
    pub topic: String,
    pub payload_bytes: usize,
    /// RFC 3339, UTC.
    pub time: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_as_json_writes_them() {
        for c in RefusalCode::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }
}
