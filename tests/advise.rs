//! `fhecam plan --advise` through the real binary on imported Brevitas fixtures: it names
//! the costly layers and why, and its estimates equal what `fhecam plan` gives for the
//! changed model, which this test builds itself from the model's JSON (not with the advice
//! code).

use serde_json::{json, Value};
use std::path::{Path, PathBuf};

mod common;
use common::ok;

fn import(dir: &Path, model: &str) -> PathBuf {
    let run = common::import_fixture(dir, model);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    dir.join(format!("{model}.json"))
}

/// `fhecam plan M --input-mode device-clear`'s total, from its last line.
fn plan_total(model: &Path) -> u64 {
    let out = ok(&[
        "plan",
        model.to_str().unwrap(),
        "--input-mode",
        "device-clear",
    ]);
    let last = out.lines().last().unwrap();
    assert!(last.starts_with("total "), "{last}");
    last.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn advice(model: &Path) -> (String, Value) {
    let m = model.to_str().unwrap();
    let text = ok(&["plan", m, "--input-mode", "device-clear", "--advise"]);
    let js = ok(&[
        "plan",
        m,
        "--input-mode",
        "device-clear",
        "--advise",
        "--json",
    ]);
    let v: Value = serde_json::from_str(js.lines().last().unwrap()).expect("one line of JSON");
    (text, v)
}

fn reason<'a>(layer: &'a Value, kind: &str) -> Option<&'a Value> {
    layer["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == kind)
}

/// Where a table (JSON) changes level.
fn thresholds(t: &Value) -> Vec<i64> {
    let min = t["min"].as_i64().unwrap();
    let v: Vec<i64> = t["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    (1..v.len())
        .filter(|&i| v[i] != v[i - 1])
        .map(|i| min + i as i64)
        .collect()
}

/// A table with `levels[0]` below the first threshold and one more level at each.
fn staircase(base: i64, th: &[i64]) -> Value {
    let (lo, hi) = (th[0] - 1, *th.last().unwrap());
    let values: Vec<i64> = (lo..=hi)
        .map(|x| base + th.iter().filter(|&&c| c <= x).count() as i64)
        .collect();
    json!({ "min": lo, "values": values })
}

/// The model with node `k`'s tables on the power of two nearest their mean level spacing,
/// thresholds evenly spaced from the first; `ties`: every other threshold (1st, 3rd, …) one
/// unit later, as ONNX rounds ties to even.
fn power_of_two_tables(model: &Value, k: usize, ties: bool) -> Value {
    let mut m = model.clone();
    for t in m["nodes"][k]["op"]["tables"].as_array_mut().unwrap() {
        let th = thresholds(t);
        let n = th.len() as i64;
        let spacing = (th[th.len() - 1] - th[0]) as f64 / (n - 1) as f64;
        let step = 2f64.powf(spacing.log2().round()) as i64;
        let new: Vec<i64> = (0..n)
            .map(|i| th[0] + step * i + (ties && i % 2 == 0) as i64)
            .collect();
        *t = staircase(t["values"][0].as_i64().unwrap(), &new);
    }
    m
}

/// The model with the last layer's (a dense layer's) weights as -1, 0, +1: divided by the
/// largest magnitude their range allows and rounded, the bias likewise.
fn ternary_dense(model: &Value, k: usize) -> Value {
    let mut m = model.clone();
    assert_eq!(
        k + 1,
        m["nodes"].as_array().unwrap().len(),
        "the last layer"
    );
    let op = &mut m["nodes"][k]["op"];
    let wr = &op["weight_range"];
    let r = wr[0].as_f64().unwrap().abs().max(wr[1].as_f64().unwrap());
    let div = |v: &Value| (v.as_f64().unwrap() / r).round() as i64;
    let weights: Vec<i64> = op["weights"].as_array().unwrap().iter().map(div).collect();
    let bias: Vec<i64> = op["bias"].as_array().unwrap().iter().map(div).collect();
    let br = &op["bias_range"];
    let br = json!([
        (br[0].as_f64().unwrap() / r).floor() as i64,
        (br[1].as_f64().unwrap() / r).ceil() as i64
    ]);
    op["weights"] = json!(weights);
    op["bias"] = json!(bias);
    op["weight_range"] = json!([-1, 1]);
    op["bias_range"] = br;
    m
}

fn write(dir: &Path, name: &str, m: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, m.to_string()).unwrap();
    p
}

fn within_10_percent(estimate: u64, planned: u64, what: &str) {
    eprintln!("{what}: advice estimates {estimate}, plan of the changed model {planned}");
    let err = (estimate as f64 - planned as f64).abs() / planned as f64;
    assert!(err <= 0.10, "{what}: {estimate} vs {planned}");
}

#[test]
fn advice_names_the_costly_layers_and_its_estimates_hold() {
    let dir = tempfile::tempdir().unwrap();
    for (name, act_node, dense_node) in [("qat_cnn_3bit", 1, 3), ("qat_cnn_bn_3bit", 1, 4)] {
        let path = import(dir.path(), name);
        let model: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let total = plan_total(&path);
        let (text, a) = advice(&path);

        // figures per layer, and the same total as `plan`
        assert_eq!(a["total_pbs"].as_u64().unwrap(), total, "{name}");
        assert_eq!(a["input_mode"], "device-clear");
        let layers = a["layers"].as_array().unwrap();
        let sum: u64 = layers.iter().map(|l| l["pbs"].as_u64().unwrap()).sum();
        assert_eq!(sum + a["output_pbs"].as_u64().unwrap(), total, "{name}");
        let act = &layers[act_node];
        assert_eq!(act["op"], "activation");
        let per_act = act["activation"]["pbs_per_activation"].as_f64().unwrap();
        assert!(per_act > 60.0, "{name}: {per_act} PBS per activation");
        let dense = &layers[dense_node];
        assert_eq!(dense["op"], "dense");
        assert_eq!(dense["linear"]["macs"], 1280);
        assert_eq!(dense["linear"]["weight_bits"], 3);
        assert_eq!(dense["linear"]["activation_bits"], 3);
        assert_eq!(dense["linear"]["pbs_per_mac"].as_f64().unwrap(), 4.0);

        // the reasons, in the text too
        let r = reason(act, "spacing_not_power_of_two").expect("the activation's reason");
        assert!(text.contains(&format!("node {act_node} (activation): level spacing ")));
        assert!(
            text.contains("is not a power of two: each of 7 thresholds is compared digit by digit")
        );
        let w = reason(dense, "wide_weights").expect("the dense layer's reason");
        assert!(text.contains(&format!(
            "node {dense_node} (dense): products of 3-bit weights × 3-bit activations over a 128-term sum"
        )));
        assert!(text.contains("2-bit weights (−1, 0, +1) would cut this layer about 2.0×"));

        // the activation's estimate against the plan of tables this test re-made
        let changed = write(
            dir.path(),
            &format!("{name}.pow2.json"),
            &power_of_two_tables(&model, act_node, false),
        );
        let planned = plan_total(&changed);
        within_10_percent(r["estimate"]["total_pbs"].as_u64().unwrap(), planned, name);
        assert!(planned < total * 9 / 10, "{name}: {planned} vs {total}");
        // and ONNX's rounding of the same steps
        let ties = write(
            dir.path(),
            &format!("{name}.ties.json"),
            &power_of_two_tables(&model, act_node, true),
        );
        within_10_percent(
            r["ties_to_even"]["total_pbs"].as_u64().unwrap(),
            plan_total(&ties),
            &format!("{name} ties to even"),
        );

        // the dense layer's: weights -3..3 as -1, 0, +1 (w/3 rounded), bias likewise; it is
        // the last layer, so no table reads its sums
        let changed = write(
            dir.path(),
            &format!("{name}.w2.json"),
            &ternary_dense(&model, dense_node),
        );
        within_10_percent(
            w["estimate"]["total_pbs"].as_u64().unwrap(),
            plan_total(&changed),
            &format!("{name} 2-bit dense weights"),
        );
    }

    // 2-bit weights on one scale per class: the import puts the output layer on one scale
    // (8-bit integers); the advice says so, and what one scale would save
    let path = import(dir.path(), "qat_cnn_2bit");
    let model: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (text, a) = advice(&path);
    let dense = &a["layers"][3];
    assert_eq!(dense["linear"]["weight_bits"], 8);
    assert_eq!(dense["linear"]["weight_bits_per_output"], 2);
    let w = reason(dense, "wide_weights").expect("the output layer's reason");
    assert!(text.contains("each output's weights are 2-bit on a scale of its own"));
    assert!(text.contains("export this layer with one (per-tensor) weight scale"));
    let changed = write(
        dir.path(),
        "qat_cnn_2bit.w2.json",
        &ternary_dense(&model, 3),
    );
    within_10_percent(
        w["estimate"]["total_pbs"].as_u64().unwrap(),
        plan_total(&changed),
        "qat_cnn_2bit 2-bit dense weights on one scale",
    );
    if let Some(r) = reason(&a["layers"][1], "spacing_not_power_of_two") {
        let changed = write(
            dir.path(),
            "qat_cnn_2bit.pow2.json",
            &power_of_two_tables(&model, 1, false),
        );
        within_10_percent(
            r["estimate"]["total_pbs"].as_u64().unwrap(),
            plan_total(&changed),
            "qat_cnn_2bit",
        );
    }

    // the recipe's activation is already on a power-of-two step (4 units) and plans as
    // cheaply as it would evenly spaced: no reason for it
    let path = import(dir.path(), "recipe_cnn_2bit");
    let model: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (text, a) = advice(&path);
    assert_eq!(a["total_pbs"], 4118);
    let act = &a["layers"][1];
    assert_eq!(act["activation"]["tables"][0]["power_of_two"], 4);
    assert_eq!(
        act["activation"]["tables"][0]["spacing"].as_f64(),
        Some(4.0)
    );
    assert_eq!(act["reasons"].as_array().unwrap().len(), 0, "{text}");
    assert!(!text.contains("(activation):"), "{text}");
    let even = write(
        dir.path(),
        "recipe.pow2.json",
        &power_of_two_tables(&model, 1, false),
    );
    assert!(plan_total(&even) * 10 > 4118 * 9);
    // `plan` without --advise prints what it always did
    let plain = ok(&[
        "plan",
        path.to_str().unwrap(),
        "--input-mode",
        "device-clear",
    ]);
    assert!(plain.lines().last().unwrap().starts_with(
        "total 4118 PBS for 2496 multiply-accumulates (1.65 PBS per MAC all-in), device-clear input"
    ));
}
