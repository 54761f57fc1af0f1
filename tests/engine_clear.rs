//! The encrypted circuits, run on the exact plaintext model of the TFHE arithmetic, equal
//! the integer reference on many fresh random networks — and the planner agrees with the
//! PBS the run actually spent.

use fhecam::fhe::backend::ClearBackend;
use fhecam::fhe::circuit::Engine;
use fhecam::fhe::eval;
use fhecam::reference;
use fhecam::testnet::{assert_reference, random_input, random_model, Shape};
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
        assert_reference(&m, &x, &got, &format!("seed {seed}"));
    }
}

/// Every seed of `seeds` on networks of `shape`.
fn check_seeds(seeds: std::ops::Range<u64>, shape: Shape) {
    seeds.for_each(|seed| check(seed, shape));
}

#[test]
fn random_small_networks_match_reference() {
    check_seeds(0..300, Shape::small());
}

#[test]
fn random_tiny_networks_match_reference() {
    check_seeds(1000..1300, Shape::tiny());
}

#[test]
fn random_multi_digit_networks_match_reference() {
    check_seeds(2000..2300, Shape::tiny_wide());
}

/// The parameters of a model as the clear backend takes them.
type ClearParams = Vec<Option<eval::LayerParams<u64, eval::ClearTable>>>;

/// On 40 random small networks: how many give other logits than the reference once
/// `tamper` changed their parameters (it returns false to skip a network), run with the
/// frame encrypted or, with `device_clear`, in the clear.
fn tampered_runs_differ(
    device_clear: bool,
    tamper: impl Fn(&fhecam::model::Model, &mut ClearParams) -> bool,
) -> usize {
    let mut differs = 0;
    for seed in 0..40 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let m = random_model(&mut rng, Shape::small());
        if device_clear && eval::check_device_clear(&m).is_err() {
            continue;
        }
        let x = random_input(&mut rng, &m);
        let mut params = eval::map_params(&m, &mut |v| v).unwrap();
        if !tamper(&m, &mut params) {
            continue;
        }
        let e = Engine::new(ClearBackend);
        let out = match device_clear {
            true => eval::run_device_clear(&e, &m, &params, &x),
            false => eval::run(&e, &m, &params, eval::input_digits(&m, &x)),
        }
        .unwrap();
        let got = out.layout().logits(&out.flatten());
        differs += (got != reference::evaluate(&m, &x).unwrap()) as usize;
    }
    differs
}

#[test]
fn a_wrong_weight_changes_the_result() {
    // guards against a vacuous comparison: the circuits must actually read the weights
    let differs = tampered_runs_differ(false, |_, params| {
        let last = params.iter_mut().rev().find_map(|p| p.as_mut()).unwrap();
        last.weights[0] ^= 1;
        true
    });
    assert!(differs > 0);
}

/// Device-clear input: the same networks, the frame held in the clear, the layers that read
/// it picking products from their clear tables. Equal to the reference, the plan equal to
/// the run, and never more PBS than with the frame encrypted.
fn check_device_clear(seed: u64, shape: Shape) -> bool {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let m = random_model(&mut rng, shape);
    if eval::check_device_clear(&m).is_err() {
        return false;
    }
    let params = eval::map_params(&m, &mut |v| v).unwrap();
    let (planned, layout) = eval::plan_mode(&m, eval::InputMode::DeviceClear).unwrap();
    let (planned_enc, _) = eval::plan(&m).unwrap();
    assert!(
        planned.iter().sum::<u64>() <= planned_enc.iter().sum::<u64>(),
        "seed {seed}: device-clear plans more PBS"
    );
    for _ in 0..3 {
        let x = random_input(&mut rng, &m);
        let e = Engine::new(ClearBackend);
        let out = eval::run_device_clear(&e, &m, &params, &x).unwrap();
        assert_eq!(
            out.pbs_per_node, planned,
            "seed {seed}: plan differs from run"
        );
        assert_eq!(out.layout(), layout);
        assert!(out.logits.iter().flat_map(|l| &l.d).all(|v| v.var <= 1));
        let got = layout.logits(&out.flatten());
        assert_eq!(got, reference::evaluate(&m, &x).unwrap(), "seed {seed}");
    }
    true
}

#[test]
fn device_clear_input_matches_reference() {
    let mut ran = 0;
    for seed in 0..200 {
        ran += check_device_clear(seed, Shape::small()) as usize;
    }
    for seed in 2000..2200 {
        ran += check_device_clear(seed, Shape::tiny_wide()) as usize;
    }
    assert!(
        ran >= 200,
        "only {ran} of 400 random networks read their input directly"
    );
    // the others (pooling or adding the frame first) are refused with the reason
    let mut refused = random_model(&mut ChaCha8Rng::seed_from_u64(1), Shape::small());
    for n in &mut refused.nodes {
        for i in &mut n.inputs {
            *i += 1;
        }
    }
    refused.nodes.insert(
        0,
        fhecam::model::Node {
            op: fhecam::model::Op::MaxPool(fhecam::model::MaxPool {
                kernel: [1, 1],
                stride: [1, 1],
            }),
            inputs: vec![0],
        },
    );
    refused
        .infer()
        .expect("a 1x1 max pool in front keeps the shapes");
    let params = eval::map_params(&refused, &mut |v| v).unwrap();
    let x = vec![0; refused.input.len()];
    let err = eval::run_device_clear(&Engine::new(ClearBackend), &refused, &params, &x)
        .err()
        .unwrap();
    assert_eq!(err, eval::EvalError::DeviceClearUnsupported);
    assert!(
        err.to_string().contains("input_mode = \"encrypted\""),
        "{err}"
    );
}

#[test]
fn device_clear_reads_the_clear_tables() {
    // a wrong table entry must change some result: the tables are what the frame meets
    let differs = tampered_runs_differ(true, |m, params| {
        // the tables of two weights swapped: every entry stays within its public bound
        let wr = match &m.nodes[0].op {
            fhecam::model::Op::Conv2d(fhecam::model::Conv2d { weight_range, .. })
            | fhecam::model::Op::Dense(fhecam::model::Dense { weight_range, .. }) => *weight_range,
            _ => return false,
        };
        let per_weight = eval::ClearTables::of(m.input.bits, wr).per_weight();
        let first = params[0].as_mut().unwrap();
        let (a, b) = first.clear_tables.split_at_mut(per_weight);
        a.swap_with_slice(&mut b[..per_weight]);
        true
    });
    assert!(differs > 0);
}
