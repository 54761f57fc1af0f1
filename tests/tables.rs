//! Secret-table networks (issue 23): the integer layer types (`lut`, `group_sum`), their
//! checks on untrusted JSON, the plaintext reference, and the trainer
//! (`fhecam train --family tables`).

mod common;

use common::{ok, refused, s};
use fhecam::data::{load_digits, stratified_split};
use fhecam::fhe::backend::ClearBackend;
use fhecam::fhe::circuit::Engine;
use fhecam::fhe::eval::{self, InputMode};
use fhecam::model::{GroupSum, Lut, LutNeuron};
use fhecam::model::{InputSpec, Model, Node, Op, MODEL_FORMAT_VERSION};
use fhecam::reference;
use fhecam::train_tables::{train, TablesConfig};
use serde_json::{json, Value};

fn neuron(inputs: &[u32], mul: &[u16], table: &[u8]) -> LutNeuron {
    LutNeuron {
        inputs: inputs.to_vec(),
        mul: mul.to_vec(),
        table: table.to_vec(),
    }
}

/// 2x2 input of 2-bit pixels [a, b, c, d]; bits A = [a ≥ 2], B = [b > c], C = [d = 0];
/// class 0 scores table0[A + 2B] + table1[C] (class 1 likewise, interleaved).
fn hand_built() -> Model {
    let b_gt_c: Vec<u8> = (0..16).map(|i| u8::from(i % 4 > i / 4)).collect();
    Model {
        format_version: MODEL_FORMAT_VERSION,
        name: "hand".into(),
        input: InputSpec {
            channels: 1,
            height: 2,
            width: 2,
            bits: 2,
            scale: 1.0 / 3.0,
            zero: 0.0,
        },
        nodes: vec![
            Node {
                op: Op::Lut(Lut {
                    out_max: 1,
                    neurons: vec![
                        neuron(&[0], &[1], &[0, 0, 1, 1]),
                        neuron(&[1, 2], &[1, 4], &b_gt_c),
                        neuron(&[3], &[1], &[1, 0, 0, 0]),
                    ],
                    public: false,
                }),
                inputs: vec![0],
            },
            Node {
                op: Op::GroupSum(GroupSum {
                    classes: 2,
                    score_max: 3,
                    groups: vec![
                        // idx = A + 2B: (class 0, class 1) per idx
                        neuron(&[0, 1], &[1, 2], &[0, 3, 1, 0, 2, 1, 3, 2]),
                        // idx = C
                        neuron(&[2], &[1], &[1, 0, 0, 3]),
                    ],
                }),
                inputs: vec![1],
            },
        ],
        num_classes: 2,
    }
}

#[test]
fn reference_evaluates_a_hand_built_network() {
    let m = hand_built();
    let infos = m.infer().unwrap();
    assert_eq!(infos[1].len(), 3);
    assert_eq!(infos[2].range(), (0, 6));
    // a=3 → A=1; b=2 > c=1 → B=1; d=0 → C=1: idx 3 → (3, 2), idx 1 → (0, 3)
    assert_eq!(reference::evaluate(&m, &[3, 2, 1, 0]).unwrap(), vec![3, 5]);
    // a=0 → A=0; b=1 ≤ c=1 → B=0; d=2 → C=0: idx 0 → (0, 3), idx 0 → (1, 0)
    assert_eq!(reference::evaluate(&m, &[0, 1, 1, 2]).unwrap(), vec![1, 3]);
    let all = reference::evaluate_all(&m, &[2, 0, 3, 1]).unwrap();
    assert_eq!(all[1], vec![1, 0, 0]);
    assert_eq!(all[2], vec![2, 0]);
}

#[test]
fn json_round_trip_and_shape() {
    let m = hand_built();
    let text = serde_json::to_string(&m).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["nodes"][0]["op"]["type"], "lut");
    assert_eq!(v["nodes"][0]["op"]["out_max"], 1);
    assert_eq!(v["nodes"][0]["op"]["neurons"][1]["mul"], json!([1, 4]));
    assert_eq!(v["nodes"][1]["op"]["type"], "group_sum");
    assert_eq!(v["nodes"][1]["op"]["score_max"], 3);
    let back: Model = serde_json::from_str(&text).unwrap();
    assert_eq!(back, m);
}

/// The hand-built model's JSON changed by `f` must parse and be refused by `infer` with a
/// message containing `want`.
fn refused_model(f: impl FnOnce(&mut Value), want: &str) {
    let mut v = serde_json::to_value(hand_built()).unwrap();
    f(&mut v);
    let m: Model = serde_json::from_value(v).expect("still parses");
    let err = m.infer().expect_err(want).to_string();
    assert!(err.contains(want), "{err:?} should contain {want:?}");
}

#[test]
fn corrupt_tables_are_refused_with_the_problem_named() {
    refused_model(
        |v| v["nodes"][0]["op"]["neurons"][0]["inputs"][0] = json!(99),
        "node 0 (lut): neuron 0: input 99 is out of range",
    );
    refused_model(
        |v| v["nodes"][0]["op"]["neurons"][0]["table"] = json!([0, 0, 1, 1, 1]),
        "neuron 0: table has 5 entries; the index spans 4 values",
    );
    refused_model(
        |v| v["nodes"][0]["op"]["neurons"][2]["table"][1] = json!(2),
        "neuron 2: table entry 2 exceeds 1",
    );
    refused_model(
        |v| v["nodes"][1]["op"]["groups"][1]["table"][3] = json!(4),
        "node 1 (group_sum): group 1: table entry 4 exceeds 3",
    );
    refused_model(
        |v| v["nodes"][1]["op"]["groups"][1]["table"] = json!([1, 0, 0]),
        "group 1: table has 3 entries",
    );
    // element 0 of value 1 is already read with multiplier 1 by group 0
    refused_model(
        |v| {
            v["nodes"][1]["op"]["groups"]
                .as_array_mut()
                .unwrap()
                .push(json!({"inputs": [0], "mul": [2], "table": [0, 0, 0, 0, 0, 0]}))
        },
        "reads element 0 of value 1 with multiplier 2, another neuron with 1",
    );
    refused_model(
        |v| v["nodes"][0]["op"]["neurons"][1]["mul"] = json!([1, 8]),
        "index spans 28 values; a secret table indexes one 4-bit block",
    );
    refused_model(
        |v| v["nodes"][0]["op"]["neurons"][1]["mul"] = json!([1]),
        "needs one positive multiplier per input (2 inputs",
    );
    refused_model(
        |v| v["nodes"][0]["op"]["out_max"] = json!(16),
        "out_max must be 1..=15",
    );
    // a group sum's output is an accumulator: no table may read it
    refused_model(
        |v| {
            let gs = v["nodes"][1].clone();
            v["nodes"].as_array_mut().unwrap().push(json!({
                "op": {"type": "lut", "out_max": 1,
                       "neurons": [{"inputs": [0], "mul": [1], "table": [0, 1]}]},
                "inputs": [2]
            }));
            v["nodes"]
                .as_array_mut()
                .unwrap()
                .push(json!({"op": gs["op"], "inputs": [3]}));
        },
        "node 2 (lut): input must be an activation",
    );
    // unknown fields and negative indices never reach the checks
    let mut v = serde_json::to_value(hand_built()).unwrap();
    v["nodes"][0]["op"]["neurons"][0]["bias"] = json!(1);
    assert!(serde_json::from_value::<Model>(v).is_err());
    let mut v = serde_json::to_value(hand_built()).unwrap();
    v["nodes"][0]["op"]["neurons"][0]["inputs"][0] = json!(-1);
    assert!(serde_json::from_value::<Model>(v).is_err());
}

#[test]
fn the_hand_built_network_runs_exactly_in_both_input_modes() {
    // the circuits on the exact plaintext model of TFHE equal the reference on every input
    let m = hand_built();
    let params = eval::map_params(&m, &mut |v| v).unwrap();
    let (enc, _) = eval::plan_mode(&m, InputMode::Encrypted).unwrap();
    let (dc, _) = eval::plan_mode(&m, InputMode::DeviceClear).unwrap();
    // encrypted: one PBS per lut neuron; device-clear: the frame's layer picks entries
    assert_eq!(enc[0], 3);
    assert_eq!(dc[0], 0);
    for x in 0..256u32 {
        let x: Vec<u8> = (0..4).map(|i| ((x >> (2 * i)) & 3) as u8).collect();
        let want = reference::evaluate(&m, &x).unwrap();
        for mode in [InputMode::Encrypted, InputMode::DeviceClear] {
            let e = Engine::new(ClearBackend);
            let out = match mode {
                InputMode::Encrypted => eval::run(&e, &m, &params, eval::input_digits(&m, &x)),
                InputMode::DeviceClear => eval::run_device_clear(&e, &m, &params, &x),
            }
            .unwrap();
            assert_eq!(out.layout().logits(&out.flatten()), want, "{x:?} {mode:?}");
        }
    }
}

fn tiny() -> TablesConfig {
    TablesConfig {
        n1: 64,
        n2: 16,
        epochs: 8,
        ..TablesConfig::default()
    }
}

#[test]
fn tiny_training_is_deterministic_and_exports_what_it_trained() {
    let ds = load_digits().unwrap_or_else(|e| panic!("{e}"));
    let (tr, te) = stratified_split(&ds, 0.25, 42);
    let a = train(&tiny(), &tr, &te, &|_, _| {}).expect("training");
    eprintln!(
        "tiny: float {:.4} integer {:.4}, PBS {} / {}, {:.1}s",
        a.scores.accuracy_float,
        a.scores.accuracy_plain,
        a.pbs_device_clear,
        a.pbs_encrypted,
        a.scores.train_seconds
    );
    let infos = a.model.infer().expect("exported model passes the checks");
    assert_eq!(infos.len(), 5);
    assert_eq!(infos.last().unwrap().len(), 10);
    let agree = a
        .scores
        .predictions_float
        .iter()
        .zip(&a.scores.predictions_plain)
        .filter(|(x, y)| x == y)
        .count();
    assert!(
        agree * 100 >= 99 * te.len(),
        "integer and trained forward agree on {agree}/{}",
        te.len()
    );
    // the report's integer predictions are the reference's
    let img = &te.images[7];
    let logits = reference::evaluate(&a.model, &a.model.input.quantize(img)).unwrap();
    assert_eq!(reference::argmax(&logits), a.scores.predictions_plain[7]);
    // 8 epochs of a network of 76 PBS: far from the preset, well above chance (0.1)
    assert!(
        a.scores.accuracy_plain >= 0.3,
        "accuracy {}",
        a.scores.accuracy_plain
    );

    let b = train(&tiny(), &tr, &te, &|_, _| {}).expect("training");
    assert_eq!(a.model, b.model, "same seed, same model");
    let c = train(&TablesConfig { seed: 7, ..tiny() }, &tr, &te, &|_, _| {}).unwrap();
    assert_ne!(a.model, c.model, "another seed, another model");
}

#[test]
fn budget_picks_a_network_within_it() {
    for budget in [200, 500, 1000] {
        let cfg = TablesConfig::for_budget(budget, 10).unwrap();
        let pbs = cfg.estimate(InputMode::DeviceClear, [1, 8, 8], 10).unwrap();
        assert!(pbs <= budget, "{budget}: {pbs}");
    }
    let err = TablesConfig::for_budget(10, 10).unwrap_err().to_string();
    assert!(err.contains("no secret-table network fits 10 PBS"), "{err}");
}

#[test]
fn cli_trains_a_tables_model_within_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.json");
    let stdout = ok(&[
        "train",
        "--family",
        "tables",
        "--budget-pbs",
        "200",
        "--epochs",
        "3",
        "--out",
        s(&out),
    ]);
    assert!(stdout.contains("PBS per frame (plan)"), "{stdout}");
    let m: Model = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    m.infer().unwrap();
    let (pbs, _) = eval::plan_mode(&m, InputMode::DeviceClear).unwrap();
    assert!(pbs.iter().sum::<u64>() <= 200);
    let err = refused(&[
        "train",
        "--family",
        "tables",
        "--channels",
        "4",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("shape a CNN"), "{err}");
}
