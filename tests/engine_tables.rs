//! Secret-table networks (`lut`, `group_sum`): the circuits on the exact plaintext model of
//! the TFHE arithmetic equal the integer reference on hundreds of fresh random networks,
//! in both input modes, the plan equals the run, and the tables are really what the
//! frame meets. Real TFHE runs them in tests/engine_tfhe.rs.

use fhecam::fhe::backend::ClearBackend;
use fhecam::fhe::circuit::Engine;
use fhecam::fhe::eval;
use fhecam::model::Op;
use fhecam::reference;
use fhecam::testnet::{assert_reference, random_input, random_table_model, Shape};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn run(
    m: &fhecam::model::Model,
    params: &[Option<eval::LayerParams<u64, eval::ClearTable>>],
    x: &[u8],
    mode: eval::InputMode,
) -> (Vec<i64>, Vec<u64>) {
    let e = Engine::new(ClearBackend);
    let out = match mode {
        eval::InputMode::Encrypted => eval::run(&e, m, params, eval::input_digits(m, x)),
        eval::InputMode::DeviceClear => eval::run_device_clear(&e, m, params, x),
    }
    .unwrap();
    assert!(
        out.logits.iter().flat_map(|l| &l.d).all(|v| v.var <= 1),
        "an output digit is not fresh"
    );
    let pbs = out.pbs_per_node.clone();
    (out.layout().logits(&out.flatten()), pbs)
}

fn check(seed: u64, shape: Shape) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let m = random_table_model(&mut rng, shape);
    let params = eval::map_params(&m, &mut |v| v).unwrap();
    for mode in [eval::InputMode::Encrypted, eval::InputMode::DeviceClear] {
        let (planned, _) = eval::plan_mode(&m, mode).unwrap();
        for _ in 0..2 {
            let x = random_input(&mut rng, &m);
            let (got, pbs) = run(&m, &params, &x, mode);
            assert_eq!(pbs, planned, "seed {seed} {mode:?}: plan differs from run");
            assert_reference(&m, &x, &got, &format!("seed {seed} {mode:?}"));
        }
    }
    // one PBS per neuron of every lut layer that does not read the clear frame, and per
    // many-LUT group of class tables
    let (enc, _) = eval::plan_mode(&m, eval::InputMode::Encrypted).unwrap();
    let (dc, _) = eval::plan_mode(&m, eval::InputMode::DeviceClear).unwrap();
    if let Op::Lut(l) = &m.nodes[0].op {
        assert!(enc[0] <= l.neurons.len() as u64, "seed {seed}");
        assert_eq!(dc[0], 0, "seed {seed}: the frame's layer picks its entries");
    }
    assert!(enc.iter().sum::<u64>() > dc.iter().sum::<u64>());
}

#[test]
fn random_table_networks_match_reference() {
    for seed in 0..150 {
        check(seed, Shape::tiny());
    }
    for seed in 1000..1100 {
        check(seed, Shape::small());
    }
}

#[test]
fn a_swapped_or_foreign_table_changes_the_result() {
    // guards against a vacuous comparison: the circuits must read the owner's tables
    let (mut swapped, mut foreign) = (0, 0);
    for seed in 0..40 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let m = random_table_model(&mut rng, Shape::small());
        let x = random_input(&mut rng, &m);
        let want = reference::evaluate(&m, &x).unwrap();
        let params = eval::map_params(&m, &mut |v| v).unwrap();
        // two class-score tables of the output layer swapped (same many-LUT width)
        let mut p = params.clone();
        let tables = &mut p[m.nodes.len() - 1].as_mut().unwrap().tables;
        if let Some(j) = (1..tables.len()).find(|&j| tables[j].len() == tables[0].len()) {
            tables.swap(0, j);
            swapped += (run(&m, &p, &x, eval::InputMode::Encrypted).0 != want) as usize;
        }
        // the tables of another network of the same shape
        let mut other = m.clone();
        for n in &mut other.nodes {
            if let Op::GroupSum(g) = &mut n.op {
                for group in &mut g.groups {
                    group.table.iter_mut().for_each(|v| *v = g.score_max - *v);
                }
            }
        }
        let p = eval::map_params(&other, &mut |v| v).unwrap();
        foreign += (run(&m, &p, &x, eval::InputMode::Encrypted).0 != want) as usize;
    }
    assert!(
        swapped > 0 && foreign > 0,
        "swapped {swapped}, foreign {foreign}"
    );
}

#[test]
fn wiring_the_circuit_cannot_evaluate_is_refused_with_the_reason() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let m = random_table_model(&mut rng, Shape::small());
    let json = serde_json::to_string(&m).unwrap();
    let bad = |edit: &dyn Fn(&mut fhecam::model::Model)| {
        let mut b: fhecam::model::Model = serde_json::from_str(&json).unwrap();
        edit(&mut b);
        b.infer().err().map(|e| e.to_string()).unwrap_or_default()
    };
    fn lut1(b: &mut fhecam::model::Model) -> &mut fhecam::model::Lut {
        match &mut b.nodes[1].op {
            Op::Lut(l) => l,
            _ => panic!("random_table_model has two lut layers first"),
        }
    }
    let e = bad(&|b| lut1(b).neurons[0].inputs[0] = 1 << 20);
    assert!(e.contains("out of range"), "{e}");
    let e = bad(&|b| {
        lut1(b).neurons[0].table.pop();
    });
    assert!(e.contains("entries"), "{e}");
    let e = bad(&|b| lut1(b).neurons[0].table[0] = 200);
    assert!(e.contains("exceeds"), "{e}");
    // an element read with two multipliers
    let e = bad(&|b| {
        let l = lut1(b);
        let (i, m) = (l.neurons[0].inputs[0], l.neurons[0].mul[0]);
        let other = l.neurons.iter_mut().skip(1).find(|n| n.mul[0] != m);
        if let Some(n) = other {
            n.inputs[0] = i;
        } else {
            l.neurons[0].mul[0] = m + 1;
        }
    });
    assert!(
        !e.is_empty(),
        "a wiring with two multipliers for one element was accepted"
    );
}
