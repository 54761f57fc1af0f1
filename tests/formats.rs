//! Untrusted bytes: truncated, oversized or garbage encrypted models and outputs are refused
//! with a clear error, never a panic.

use fhecam::fhe::{limits, EncryptedModel, EncryptedOutput, FheError, OwnerKeys};
use fhecam::model::Model;
use fhecam::testnet::{random_model, Shape};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn model() -> Model {
    random_model(&mut ChaCha8Rng::seed_from_u64(3), Shape::tiny())
}

#[test]
fn encrypted_model_round_trips_and_rejects_damage() {
    let keys = OwnerKeys::generate();
    let m = model();
    let bytes = EncryptedModel::encrypt(&m, &keys)
        .unwrap()
        .to_bytes()
        .unwrap();
    let back = EncryptedModel::from_bytes(&bytes).unwrap();
    // nothing of the clear parameters travels with the architecture
    assert_eq!(back.arch, fhecam::fhe::strip_parameters(&m));
    assert_ne!(back.arch, m);

    for cut in [0, 1, 7, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
        let err = EncryptedModel::from_bytes(&bytes[..cut])
            .err()
            .expect("truncated accepted");
        assert!(err.to_string().contains("encrypted"), "{err}");
    }
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| ((i * 2654435761u32) >> 13) as u8)
        .collect();
    assert!(EncryptedModel::from_bytes(&garbage).is_err());

    let big = vec![0u8; limits::MODEL as usize + 1];
    assert!(matches!(
        EncryptedModel::from_bytes(&big),
        Err(FheError::TooLarge { .. })
    ));
}

#[test]
fn encrypted_output_rejects_damage() {
    let big = vec![0u8; limits::OUTPUT as usize + 1];
    assert!(matches!(
        EncryptedOutput::from_bytes(&big),
        Err(FheError::TooLarge { .. })
    ));
    for junk in [&b""[..], &b"\x01\x00\x00\x00"[..], &[0xffu8; 64][..]] {
        assert!(EncryptedOutput::from_bytes(junk).is_err());
    }
}

#[test]
fn invalid_models_are_refused_with_a_reason() {
    let mut m = model();
    m.format_version = 99;
    assert!(m.infer().unwrap_err().to_string().contains("version 99"));
    let mut m = model();
    if let fhecam::model::Op::Conv2d(fhecam::model::Conv2d { weights, .. }) = &mut m.nodes[0].op {
        weights.pop();
    }
    let e = m.infer().unwrap_err().to_string();
    assert!(
        e.contains("node 0 (conv2d)") && e.contains("weights"),
        "{e}"
    );
    let mut m = model();
    m.num_classes = 7;
    assert!(m.infer().unwrap_err().to_string().contains("num_classes"));
}

#[test]
fn packed_output_round_trips_small_and_refuses_damage_and_old_formats() {
    use fhecam::fhe::eval::OutputLayout;
    let keys = OwnerKeys::generate();
    // ten logits of four digits: the reference model's shape
    let layout = OutputLayout {
        offsets: (0..10).map(|i| -100 * i).collect(),
        digits: vec![4; 10],
    };
    let values: Vec<u64> = (0..40u64).map(|i| (i * 7 + i / 5) % 4).collect();
    let out = EncryptedOutput::encrypt_digits(&keys, layout.clone(), &values).unwrap();
    let bytes = out.to_bytes().unwrap();
    assert!(bytes.len() < 2048, "{} bytes", bytes.len());
    let back = EncryptedOutput::from_bytes(&bytes).unwrap();
    let d = back.decrypt(&keys).unwrap();
    let want = layout.logits(&values);
    assert_eq!(d.logits, want);
    assert_eq!(d.label, fhecam::reference::argmax(&want));

    // every truncation and a flipped byte anywhere in the layout or the GLWE header is a
    // clear error, never a panic
    for cut in 0..bytes.len().min(300) {
        assert!(
            EncryptedOutput::from_bytes(&bytes[..cut]).is_err(),
            "cut {cut}"
        );
    }
    for at in 0..bytes.len().min(400) {
        let mut b = bytes.clone();
        b[at] ^= 0x5a;
        if let Ok(o) = EncryptedOutput::from_bytes(&b) {
            // a flipped coefficient parses; decryption tells the owner or yields values
            let _ = o.decrypt(&keys);
        }
    }
    // the outputs of cameras before compressed outputs say what to do
    let mut old = bytes.clone();
    old[..4].copy_from_slice(&1u32.to_le_bytes());
    let err = EncryptedOutput::from_bytes(&old).err().unwrap().to_string();
    assert!(err.contains("update the camera"), "{err}");

    // another owner's key: some digit decrypts with its padding bit set
    let other = OwnerKeys::generate();
    assert!(matches!(back.decrypt(&other), Err(FheError::WrongKey(_))));

    // owner keys serialized before the compression key existed are refused with the fix
    let mut legacy = Vec::new();
    tfhe::safe_serialization::safe_serialize(
        &tfhe::ClientKey::generate(fhecam::fhe::config()),
        &mut legacy,
        limits::PUBLIC_KEY,
    )
    .unwrap();
    let err = OwnerKeys::from_bytes(&legacy).err().unwrap().to_string();
    assert!(err.contains("protect the model again"), "{err}");
    let again = OwnerKeys::from_bytes(&keys.to_bytes().unwrap()).unwrap();
    assert_eq!(back.decrypt(&again).unwrap(), d);
}

#[test]
fn ten_logits_of_up_to_256_digits_publish_in_at_most_4_kb() {
    use fhecam::fhe::eval::OutputLayout;
    use fhecam::wire::envelope::{encode, Envelope, MAX_ID_LEN};
    let keys = OwnerKeys::generate();
    // one GLWE holds 256 digits: its mask is fixed, each digit adds 12 bits
    for digits in [10usize, 60, 90, 256] {
        let mut per = vec![digits / 10; 10];
        per[9] += digits % 10;
        let layout = OutputLayout {
            offsets: vec![i64::MIN / 2; 10],
            digits: per,
        };
        let out = EncryptedOutput::encrypt_digits(&keys, layout, &vec![2; digits]).unwrap();
        let payload = encode(&Envelope {
            device_id: "d".repeat(MAX_ID_LEN),
            camera_id: "c".repeat(MAX_ID_LEN),
            model_id: fhecam::ids::ModelId([7; 16]),
            model_version: u32::MAX,
            sequence: u64::MAX,
            epoch: u64::MAX,
            frame_timestamp_ms: u64::MAX,
            ciphertext: out.to_bytes().unwrap(),
        })
        .unwrap();
        eprintln!("{digits} digits: {} B published", payload.len());
        assert!(
            payload.len() <= 4096,
            "{digits} digits: {} B",
            payload.len()
        );
    }
}
