//! Real TFHE with the default secure parameters: every weight and bias encrypted, the input
//! encrypted with the compact public key, decrypted logits equal the plaintext reference
//! exactly. Tiny shapes keep the PBS count CI-sized.

use fhecam::fhe::eval::InputMode;
use fhecam::fhe::{EdgeRuntime, EncryptedModel, EncryptedOutput, FheError, Frame, OwnerKeys};
use fhecam::reference;
use fhecam::testnet::{random_input, random_model, Shape};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::OnceLock;

fn keys() -> &'static OwnerKeys {
    static K: OnceLock<OwnerKeys> = OnceLock::new();
    K.get_or_init(OwnerKeys::generate)
}

#[test]
fn random_encrypted_networks_match_reference_bit_for_bit() {
    let keys = keys();
    // seeds 0..3 keep 2-bit values; 100 has multi-digit weights and activations (as
    // imported models do)
    for (seed, shape) in [
        (0u64, Shape::tiny()),
        (1, Shape::tiny()),
        (2, Shape::tiny()),
        (100, Shape::tiny_wide()),
    ] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let m = random_model(&mut rng, shape);
        let enc = EncryptedModel::encrypt(&m, keys).unwrap();
        // through the wire format, as a camera receives it
        let enc = EncryptedModel::from_bytes(&enc.to_bytes().unwrap()).unwrap();
        let rt = EdgeRuntime::new(&enc, keys.public_material(), 0).unwrap();
        let x = random_input(&mut rng, &m);
        let (out, stats) = rt.infer(&rt.encrypt(&x)).unwrap();
        assert_eq!(stats.pbs, rt.planned_pbs().iter().sum::<u64>());
        let out = EncryptedOutput::from_bytes(&out.to_bytes().unwrap()).unwrap();
        let got = out.decrypt(keys).unwrap();
        let want = reference::evaluate(&m, &x).unwrap();
        assert_eq!(got.logits, want, "seed {seed}");
        assert_eq!(got.label, reference::argmax(&want), "seed {seed}");
        eprintln!("seed {seed}: {} PBS, logits {:?}", stats.pbs, got.logits);
    }
}

#[test]
fn output_under_another_key_is_refused() {
    let keys = keys();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let m = random_model(&mut rng, Shape::tiny());
    let enc = EncryptedModel::encrypt(&m, keys).unwrap();
    let rt = EdgeRuntime::new(&enc, keys.public_material(), 0).unwrap();
    let (out, _) = rt.infer(&rt.encrypt(&random_input(&mut rng, &m))).unwrap();
    // generated on another thread than keys() may have been: each thread's tfhe engine has
    // its own seed, which fhecam draws from the OS (a CPU with a repeating RDSEED once made
    // these two keys equal)
    let other = std::thread::spawn(OwnerKeys::generate).join().unwrap();
    assert_ne!(
        other.to_bytes().unwrap(),
        keys.to_bytes().unwrap(),
        "two owners' keys are equal: key generation is not seeded from fresh randomness"
    );
    // a different secret key decrypts to noise: some digit has its padding bit set
    // (probability that none has, by chance: (1/2)^digits)
    let mut outs = vec![out];
    for _ in 0..3 {
        let (o, _) = rt.infer(&rt.encrypt(&random_input(&mut rng, &m))).unwrap();
        outs.push(o);
    }
    let refused = outs
        .iter()
        .filter(|o| matches!(o.decrypt(&other), Err(FheError::WrongKey(_))))
        .count();
    assert!(refused >= 3, "only {refused}/4 refused");
}

#[test]
fn trained_model_on_real_digits_images_matches_reference() {
    // A small trained model (one conv channel) on real scikit-learn digits test images.
    let ds = fhecam::data::load_digits().expect("digits data: run scripts/setup.sh");
    let (tr, te) = fhecam::data::stratified_split(&ds, 0.25, 42);
    let cfg = fhecam::train::TrainConfig {
        conv_channels: 1,
        epochs: 5,
        ..Default::default()
    };
    let report = fhecam::train::train(&cfg, &tr, &te, &|_, _| {}).unwrap();
    let m = report.model;
    let keys = keys();
    let enc = EncryptedModel::encrypt(&m, keys).unwrap();
    let rt = EdgeRuntime::new(&enc, keys.public_material(), 0).unwrap();
    for i in [0, 17] {
        let x = m.input.quantize(&te.images[i]);
        let (out, _) = rt.infer(&rt.encrypt(&x)).unwrap();
        let got = out.decrypt(keys).unwrap();
        let want = reference::evaluate(&m, &x).unwrap();
        assert_eq!(got.logits, want, "test image {i}");
        assert_eq!(got.label, reference::argmax(&want));
        // the same image held in the clear by the device: same logits, fewer PBS
        let (out, stats) = rt.infer_frame(Frame::Clear(&x)).unwrap();
        let planned = rt.planned_pbs_in(InputMode::DeviceClear).unwrap();
        assert_eq!(stats.pbs, planned.iter().sum::<u64>());
        assert!(stats.pbs < rt.planned_pbs().iter().sum::<u64>());
        assert_eq!(
            out.decrypt(keys).unwrap().logits,
            want,
            "test image {i}, device-clear"
        );
    }
}

#[test]
fn device_clear_input_on_a_multi_digit_network_matches_reference() {
    let keys = keys();
    let mut rng = ChaCha8Rng::seed_from_u64(100);
    let m = random_model(&mut rng, Shape::tiny_wide());
    fhecam::fhe::eval::check_device_clear(&m).expect("seed 100 reads its input directly");
    let enc = EncryptedModel::encrypt(&m, keys).unwrap();
    // the clear tables through the wire format, as a camera receives them
    let enc = EncryptedModel::from_bytes(&enc.to_bytes().unwrap()).unwrap();
    let rt = EdgeRuntime::new(&enc, keys.public_material(), 0).unwrap();
    for _ in 0..2 {
        let x = random_input(&mut rng, &m);
        let (out, stats) = rt.infer_frame(Frame::Clear(&x)).unwrap();
        let want = reference::evaluate(&m, &x).unwrap();
        assert_eq!(out.decrypt(keys).unwrap().logits, want);
        eprintln!(
            "device-clear: {} PBS (encrypted input: {})",
            stats.pbs,
            rt.planned_pbs().iter().sum::<u64>()
        );
    }
}

#[test]
fn random_secret_table_network_matches_reference_bit_for_bit() {
    // every table encrypted by the owner (a GLWE accumulator under the client key), through
    // the wire format; both input modes; the tables of another owner decrypt to other logits
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut m = fhecam::testnet::random_table_model(&mut rng, Shape::tiny());
    if let fhecam::model::Op::Lut(l) = &mut m.nodes[0].op {
        l.public = false;
    }
    let mut published = m.clone();
    fhecam::layer::lut::publish_frame_tables(&mut published);
    for m in [m, published] {
        secret_tables_round_trip(&m, &mut rng);
    }
}

fn secret_tables_round_trip(m: &fhecam::model::Model, rng: &mut ChaCha8Rng) {
    let (keys, m) = (keys(), m.clone());
    let enc = EncryptedModel::encrypt(&m, keys).unwrap();
    assert!(
        enc.arch.nodes.iter().all(|n| match &n.op {
            fhecam::model::Op::Lut(l) => {
                l.public || l.neurons.iter().all(|n| n.table.iter().all(|&v| v == 0))
            }
            fhecam::model::Op::GroupSum(g) =>
                g.groups.iter().all(|n| n.table.iter().all(|&v| v == 0)),
            _ => true,
        }),
        "the public architecture carries a table"
    );
    let enc = EncryptedModel::from_bytes(&enc.to_bytes().unwrap()).unwrap();
    let rt = EdgeRuntime::new(&enc, keys.public_material(), 0).unwrap();
    for mode in [InputMode::Encrypted, InputMode::DeviceClear] {
        let x = random_input(rng, &m);
        let frame = rt.frame_input(mode, &x);
        let (out, stats) = rt.infer_frame(frame.as_frame()).unwrap();
        assert_eq!(
            stats.pbs,
            rt.planned_pbs_in(mode).unwrap().iter().sum::<u64>()
        );
        let got = EncryptedOutput::from_bytes(&out.to_bytes().unwrap())
            .unwrap()
            .decrypt(keys)
            .unwrap();
        assert_eq!(got.logits, reference::evaluate(&m, &x).unwrap(), "{mode:?}");
        eprintln!(
            "secret tables, {mode:?}: {} PBS, logits {:?}",
            stats.pbs, got.logits
        );
    }
}
