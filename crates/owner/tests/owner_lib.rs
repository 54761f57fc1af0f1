//! The owner's library path without the binary: protect a fresh random network into a real
//! SQLite database, build its signed bundle, run it as a camera would (real TFHE, default
//! parameters), wrap the output in an envelope, decrypt it: the logits equal the plaintext
//! integer reference's. Then a result under a version the database does not hold, and a
//! wrong passphrase, are refused by name.

use fhecam_engine::fhe::EdgeRuntime;
use fhecam_engine::reference;
use fhecam_engine::testnet::{random_input, random_model, Shape};
use fhecam_owner::decrypt::{DecryptError, Decryptor};
use fhecam_owner::secret::{KdfParams, Passphrase};
use fhecam_owner::store::Store;
use fhecam_owner::{deploy, protect};
use fhecam_proto::{bundle, wire::envelope};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn protect_deploy_run_and_decrypt_as_a_library() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::create_or_open(&dir.path().join("owner.db")).unwrap();
    let pass = Passphrase::new("a library test passphrase".into()).unwrap();
    // the cheapest Argon2 the sealing accepts: this test is about the flow, not the KDF
    let kdf = KdfParams {
        m_cost_kib: 8 * 1024,
        t_cost: 1,
        p_cost: 1,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let model = random_model(&mut rng, Shape::tiny());
    let mut steps = Vec::new();
    let p = protect::protect(&model, "lib", &mut store, &pass, kdf, &mut |s| {
        steps.push(s)
    })
    .unwrap();
    assert_eq!(
        steps,
        [
            protect::Step::Keys,
            protect::Step::Encrypt,
            protect::Step::SealAndStore
        ]
    );
    assert_eq!((p.name.as_str(), p.version), ("lib", 1));

    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let built = deploy::build_bundle(&store, &p.id, &key).unwrap();
    let b = bundle::load(&built.bytes, &key.verifying_key()).unwrap();
    let rt = EdgeRuntime::new(&b.model, b.public, 0).unwrap();
    let x = random_input(&mut rng, &model);
    let (out, _) = rt.infer(&rt.encrypt(&x)).unwrap();
    let mut env = envelope::Envelope {
        device_id: "dev".into(),
        camera_id: "cam".into(),
        model_id: p.id,
        model_version: p.version,
        sequence: 0,
        epoch: 1,
        frame_timestamp_ms: 0,
        ciphertext: out.to_bytes().unwrap(),
    };

    let mut d = Decryptor::new(&store, &pass);
    let got = d.decrypt(&envelope::encode(&env).unwrap()).unwrap();
    let want = reference::evaluate(&model, &x).unwrap();
    assert_eq!(got.logits, want);
    assert_eq!(got.label, reference::argmax(&want));
    assert_eq!(got.model.name, "lib");

    env.model_version = 2;
    let e = d.decrypt(&envelope::encode(&env).unwrap()).err().unwrap();
    assert!(
        matches!(
            e,
            DecryptError::Version {
                claimed: 2,
                stored: 1,
                ..
            }
        ),
        "{e}"
    );

    env.model_version = 1;
    let wrong = Passphrase::new("not the passphrase it was sealed with".into()).unwrap();
    let e = Decryptor::new(&store, &wrong)
        .decrypt(&envelope::encode(&env).unwrap())
        .err()
        .unwrap();
    assert!(matches!(e, DecryptError::Key(_)), "{e}");
}
