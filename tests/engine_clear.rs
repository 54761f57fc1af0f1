//! The encrypted circuits, run on the exact plaintext model of the TFHE arithmetic, equal
//! the integer reference on many fresh random networks — and the planner agrees with the
//! PBS the run actually spent.

use fhecam::fhe::backend::ClearBackend;
use fhecam::fhe::circuit::Engine;
use fhecam::fhe::eval;
use fhecam::reference;
use fhecam::testnet::{random_input, random_model, Shape};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn check(seed: u64, shape: Shape) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let m = random_model(&mut rng, shape);
    let params = eval::map_params(&m, &mut |v| v).unwrap();
    let (planned, layout) = eval::plan(&m).unwrap();
    for _ in 0..3 {
        let x = random_input(&mut rng, &m);
        let e = Engine::new(ClearBackend);
        let out = eval::run(&e, &m, &params, eval::input_digits(&m, &x)).unwrap();
        assert_eq!(
            out.pbs_per_node, planned,
            "seed {seed}: plan differs from run"
        );
        assert_eq!(out.layout(), layout);
        // list compression's failure bound holds for fresh PBS outputs (or constants) only
        assert!(
            out.logits.iter().flat_map(|l| &l.d).all(|v| v.var <= 1),
            "seed {seed}: an output digit is not fresh"
        );
        let digits: Vec<u64> = out.flatten();
        assert!(
            digits.iter().all(|&d| d < 4),
            "seed {seed}: digit out of range"
        );
        let got = layout.logits(&digits);
        let want = reference::evaluate(&m, &x).unwrap();
        assert_eq!(
            got,
            want,
            "seed {seed}: model {}",
            serde_json::to_string(&m).unwrap()
        );
    }
}

#[test]
fn random_small_networks_match_reference() {
    for seed in 0..300 {
        check(seed, Shape::small());
    }
}

#[test]
fn random_tiny_networks_match_reference() {
    for seed in 1000..1300 {
        check(seed, Shape::tiny());
    }
}

#[test]
fn random_multi_digit_networks_match_reference() {
    for seed in 2000..2300 {
        check(seed, Shape::tiny_wide());
    }
}

#[test]
fn a_wrong_weight_changes_the_result() {
    // guards against a vacuous comparison: the circuits must actually read the weights
    let mut differs = 0;
    for seed in 0..40 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let m = random_model(&mut rng, Shape::small());
        let x = random_input(&mut rng, &m);
        let mut params = eval::map_params(&m, &mut |v| v).unwrap();
        let last = params.iter_mut().rev().find_map(|p| p.as_mut()).unwrap();
        last.weights[0] ^= 1;
        let e = Engine::new(ClearBackend);
        let out = eval::run(&e, &m, &params, eval::input_digits(&m, &x)).unwrap();
        let layout = out.layout();
        let got = layout.logits(&out.flatten());
        differs += (got != reference::evaluate(&m, &x).unwrap()) as usize;
    }
    assert!(differs > 0);
}
