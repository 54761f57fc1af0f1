//! ONNX models exported by PyTorch (scripts/onnx-fixtures.py), imported through the real
//! `fhecam` binary: integer accuracy within 1 point of the float model as tract runs it,
//! tract's float accuracy equal to PyTorch's, an encrypted inference equal to the plaintext
//! integer model, and clear refusals of bad input.

use fhecam::npy::{self, Array};
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{ok, refused};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx")
}

fn fx(name: &str) -> String {
    common::onnx_fixture(name)
}

fn fhecam(args: &[&str]) -> Output {
    common::run(args, None)
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("output")).expect("last line is JSON")
}

/// `fhecam eval M --onnx` on the test images: its JSON report.
fn eval_onnx(model_json: &str, onnx: &str) -> serde_json::Value {
    last_json(&ok(&[
        "eval",
        model_json,
        "--data",
        &fx("test_x.npy"),
        "--labels",
        &fx("test_y.txt"),
        "--onnx",
        &fx(&format!("{onnx}.onnx")),
        "--json",
    ]))
}

fn torch_accuracy(model: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("float_accuracy.json")).unwrap(),
    )
    .unwrap();
    v["accuracy"][model].as_f64().unwrap()
}

fn import(dir: &Path, model: &str, extra: &[&str]) -> String {
    let out = dir.join(format!("{model}.json"));
    let onnx = fx(&format!("{model}.onnx"));
    let (calib, labels) = (fx("calib_x.npy"), fx("calib_y.txt"));
    let mut args = vec![
        "import",
        &onnx,
        "--calibration",
        &calib,
        "--labels",
        &labels,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    out.to_str().unwrap().to_string()
}

#[test]
fn pytorch_models_import_within_one_point_of_float() {
    let dir = tempfile::tempdir().unwrap();
    for model in ["digits_bn", "digits_res", "digits_tanh", "digits_keras"] {
        let m = import(dir.path(), model, &[]);
        let r = eval_onnx(&m, model);
        let (plain, float) = (
            r["accuracy_plain"].as_f64().unwrap(),
            r["accuracy_float"].as_f64().unwrap(),
        );
        assert_eq!(r["samples"], 450);
        // tract runs the exported graph as PyTorch did
        assert!(
            (float - torch_accuracy(model)).abs() < 1e-9,
            "{model}: tract {float} vs torch {}",
            torch_accuracy(model)
        );
        assert!(
            plain >= float - 0.01,
            "{model}: integer accuracy {plain} is more than 1 point below float {float}"
        );
    }
}

#[test]
fn encrypted_inference_of_an_imported_model_equals_the_integer_model() {
    let dir = tempfile::tempdir().unwrap();
    // narrower than the defaults to keep CI short, still several digits per weight and
    // per input value
    let m = import(
        dir.path(),
        "digits_bn",
        &[
            "--weight-bits",
            "4",
            "--act-bits",
            "2",
            "--input-bits",
            "4",
            "--output-weight-bits",
            "4",
        ],
    );
    let out = ok(&[
        "eval",
        &m,
        "--data",
        &fx("test_x.npy"),
        "--labels",
        &fx("test_y.txt"),
        "--fhe",
        "1",
        "--json",
    ]);
    let r = last_json(&out);
    assert_eq!(r["fhe_samples"], 1);
    assert_eq!(
        r["agreement"], 1.0,
        "decrypted logits differ from the plaintext model"
    );
    assert_eq!(r["pbs_counted_by_tfhe"], r["pbs_per_inference"]);
}

#[test]
fn bad_models_and_data_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let out = p("m.json");
    let import_args = |onnx: &str, calib: &str| {
        vec![
            "import".to_string(),
            onnx.to_string(),
            "--calibration".into(),
            calib.to_string(),
            "--out".into(),
            out.clone(),
        ]
    };
    let run = |args: Vec<String>| refused(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // not protobuf at all
    std::fs::write(
        p("junk.onnx"),
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff garbage",
    )
    .unwrap();
    let e = run(import_args(&p("junk.onnx"), &fx("calib_x.npy")));
    assert!(e.contains("not a readable ONNX model"), "{e}");

    // a truncated export
    let bytes = std::fs::read(fixtures().join("digits_bn.onnx")).unwrap();
    std::fs::write(p("cut.onnx"), &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = run(import_args(&p("cut.onnx"), &fx("calib_x.npy")));
    assert!(e.contains("not a readable ONNX model"), "{e}");

    // an operator the engine has no circuit for: named, with its node and the list
    let e = run(import_args(&fx("digits_gelu.onnx"), &fx("calib_x.npy")));
    assert!(e.contains("operator Div") && e.contains("'/Div'"), "{e}");
    assert!(e.contains("fhecam imports: Conv, Gemm"), "{e}");

    // data of another shape than the model's input
    let small = Array {
        shape: vec![3, 1, 4, 4],
        data: vec![0.5; 48],
    };
    std::fs::write(p("small.npy"), small.to_npy()).unwrap();
    let e = run(import_args(&fx("digits_bn.onnx"), &p("small.npy")));
    assert!(
        e.contains("[3, 1, 4, 4]") && e.contains("(N, 1, 8, 8)"),
        "{e}"
    );

    // data that is not .npy, labels that do not match
    let e = run(import_args(&fx("digits_bn.onnx"), &fx("test_y.txt")));
    assert!(e.contains("numpy.save"), "{e}");
    let m = import(dir.path(), "digits_bn", &[]);
    std::fs::write(p("few.txt"), "1\n2\n").unwrap();
    let e = refused(&[
        "eval",
        &m,
        "--data",
        &fx("test_x.npy"),
        "--labels",
        &p("few.txt"),
    ]);
    assert!(e.contains("2 labels for 450 samples"), "{e}");
    let e = refused(&[
        "eval",
        &m,
        "--data",
        &p("small.npy"),
        "--labels",
        &p("few.txt"),
    ]);
    assert!(e.contains("3 samples") || e.contains("[3, 1, 4, 4]"), "{e}");
    // bit widths the engine does not run
    let mut a = import_args(&fx("digits_bn.onnx"), &fx("calib_x.npy"));
    a.extend(["--act-bits".into(), "6".into()]);
    let e = run(a);
    assert!(e.contains("--act-bits 6 is outside 1..=4"), "{e}");
}

#[test]
fn npy_written_by_numpy_reads_back() {
    let a = npy::read(&fixtures().join("test_x.npy")).unwrap();
    assert_eq!(a.shape, vec![450, 1, 8, 8]);
    assert!(a.data.iter().all(|v| (0.0..=1.0).contains(v)));
    assert_eq!(
        npy::read_labels(&fixtures().join("test_y.txt"))
            .unwrap()
            .len(),
        450
    );
}

#[test]
fn search_reports_each_bit_width_and_keeps_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = import(dir.path(), "digits_tanh", &["--search"]);
    let model: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
    assert_eq!(model["num_classes"], 10);
    let out = fhecam(&[
        "import",
        &fx("digits_tanh.onnx"),
        "--calibration",
        &fx("calib_x.npy"),
        "--out",
        &m,
        "--search",
    ]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.matches("agreement with float").count(), 9, "{err}");
}

/// `qat_accuracy.json` and `qat_predictions.json`: what ONNX Runtime computed on each
/// quantized fixture (scripts/qat-fixtures.py).
fn onnx_runtime(name: &str) -> (f64, Vec<usize>) {
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(f)).unwrap()).unwrap()
    };
    let acc = read("qat_accuracy.json")["fixtures"][name]["accuracy"]
        .as_f64()
        .unwrap();
    let pred = serde_json::from_value(read("qat_predictions.json")[name].clone()).unwrap();
    (acc, pred)
}

/// The integer model's predictions on the 450 test images.
fn integer_predictions(model: &str) -> Vec<usize> {
    let m: fhecam::model::Model =
        serde_json::from_str(&std::fs::read_to_string(model).unwrap()).unwrap();
    let x = npy::read(Path::new(&fx("test_x.npy"))).unwrap();
    fhecam::import::predict_int(&m, &x).unwrap()
}

fn same(a: &[usize], b: &[usize]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

#[test]
fn quantization_aware_models_import_as_exported() {
    let dir = tempfile::tempdir().unwrap();
    let labels: Vec<usize> = std::fs::read_to_string(fx("test_y.txt"))
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    // Brevitas QAT (QCDQ): the model's own integers and quantizers, so the integer model
    // predicts what ONNX Runtime predicts on the exported file
    for name in [
        "qat_cnn_3bit",
        "qat_cnn_2bit",
        "qat_cnn_bn_3bit",
        "qat_mlp_3bit",
    ] {
        let m = import(dir.path(), name, &[]);
        let (acc, pred) = onnx_runtime(name);
        let int = integer_predictions(&m);
        let agree = same(&int, &pred);
        let int_acc = same(&int, &labels);
        eprintln!(
            "{name}: same class as ONNX Runtime on {agree:.4}, accuracy {int_acc:.4} vs {acc:.4}"
        );
        assert!(agree >= 0.99, "{name}: agreement {agree}");
        assert!((int_acc - acc).abs() <= 0.005, "{name}: {int_acc} vs {acc}");
        // `eval --onnx` reads the QDQ graph itself too, and agrees with ONNX Runtime
        let r = eval_onnx(&m, name);
        let own = r["accuracy_onnx_fhecam"].as_f64().unwrap();
        assert!(
            (own - acc).abs() <= 0.005,
            "{name}: fhecam's reading {own} vs {acc}"
        );
        assert!(
            r["onnx_fhecam_int_same_class"].as_f64().unwrap() >= 0.99,
            "{r}"
        );
    }
    // ONNX Runtime's int8 static quantization: 256-level activations are merged to the
    // engine's 16, and the import says so
    let out = fhecam(&[
        "import",
        &fx("ort_qdq_bn.onnx"),
        "--calibration",
        &fx("calib_x.npy"),
        "--out",
        dir.path().join("ort.json").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("every 17 levels merged"), "{err}");
    let (_, pred) = onnx_runtime("ort_qdq_bn");
    let agree = same(
        &integer_predictions(dir.path().join("ort.json").to_str().unwrap()),
        &pred,
    );
    assert!(agree >= 0.98, "ort_qdq_bn: agreement {agree}");

    // fewer PBS than the same architecture trained in float and imported at the defaults
    let plan = |m: &str| -> u64 {
        let model: fhecam::model::Model =
            serde_json::from_str(&std::fs::read_to_string(m).unwrap()).unwrap();
        fhecam::fhe::eval::plan_mode(&model, fhecam::fhe::eval::InputMode::DeviceClear)
            .unwrap()
            .0
            .iter()
            .sum()
    };
    let qat = plan(dir.path().join("qat_cnn_3bit.json").to_str().unwrap());
    let float = plan(&import(dir.path(), "float_cnn", &[]));
    eprintln!("device-clear PBS: 3-bit QAT {qat}, float imported {float}");
    assert!(qat < float, "{qat} vs {float}");
}

#[test]
fn broken_quantized_models_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.json");
    for (fixture, says) in [
        ("qdq_softsign.onnx", "operator Softsign"),
        ("qdq_16bit.onnx", "a 16-bit quantizer"),
        ("qdq_bad_zero_point.onnx", "holds 300, outside the 0..=255"),
        (
            "fold_bad_perm.onnx",
            "Transpose '/fc/Transpose': perm [1, 1] is not a permutation",
        ),
    ] {
        let err = refused(&[
            "import",
            &fx(fixture),
            "--calibration",
            &fx("calib_x.npy"),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(err.contains(says), "{fixture}: {err}");
        assert!(!out.exists(), "{fixture}: nothing written");
    }
}

/// `fold_predictions.json` (scripts/fold-fixtures.py): ONNX Runtime's accuracy and
/// predictions on the test images.
fn fold_onnx_runtime(name: &str) -> (f64, Vec<usize>) {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("fold_predictions.json")).unwrap(),
    )
    .unwrap();
    let acc = v[name]["accuracy"].as_f64().unwrap();
    (
        acc,
        serde_json::from_value(v[name]["predictions"].clone()).unwrap(),
    )
}

#[test]
fn constant_subgraphs_on_weights_are_folded_whatever_the_exporter() {
    let dir = tempfile::tempdir().unwrap();
    // QCDQ without biases: DequantizeLinear -> Transpose -> MatMul (per-channel scales),
    // Transpose of int8 -> Clip -> DequantizeLinear -> MatMul; the weights stay the
    // model's integers, and with power-of-two scales every float sum ONNX Runtime makes is
    // exact: the integer model predicts exactly what ONNX Runtime predicts
    let name = "qcdq_nobias_pow2";
    let out = common::import_fixture(dir.path(), name);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("taken as they are, exactly"), "{err}");
    // the closing line states the model's own widths, not the post-training defaults
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("the model's own widths: weights 2–3 bits (per layer: 2, 2, 3), activations 2 bits, input 4 bits;"),
        "{said}"
    );
    let (acc, pred) = fold_onnx_runtime(name);
    let int = integer_predictions(dir.path().join(format!("{name}.json")).to_str().unwrap());
    assert_eq!(same(&int, &pred), 1.0, "{name}");
    let labels = npy::read_labels(Path::new(&fx("test_y.txt"))).unwrap();
    assert_eq!(same(&int, &labels), acc);

    // the recipe's bias-less model as Brevitas exported it (examples/qat): exact too
    let recipe: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("recipe_predictions.json")).unwrap(),
    )
    .unwrap();
    let name = "recipe_cnn_2bit_nobias";
    let pred: Vec<usize> =
        serde_json::from_value(recipe["models"][name]["predictions"].clone()).unwrap();
    let int = integer_predictions(&import(dir.path(), name, &[]));
    assert_eq!(same(&int, &pred), 1.0, "{name}");

    // float weights through Mul/Transpose/Squeeze/Reshape/Div/Cast: fhecam's float reading
    // is ONNX Runtime's model, tract agrees, and the import stays within a point of it
    let name = "float_folds";
    let (acc, pred) = fold_onnx_runtime(name);
    let parsed = fhecam::import::read_onnx(Path::new(&fx(&format!("{name}.onnx")))).unwrap();
    let x = npy::read(Path::new(&fx("test_x.npy"))).unwrap();
    let own = parsed.predict_float(&x);
    assert!(same(&own, &pred) >= 0.995, "{}", same(&own, &pred));
    let m = import(dir.path(), name, &[]);
    let r = eval_onnx(&m, name);
    let (plain, float) = (
        r["accuracy_plain"].as_f64().unwrap(),
        r["accuracy_float"].as_f64().unwrap(),
    );
    assert!(
        (float - acc).abs() <= 0.005,
        "tract {float} vs ONNX Runtime {acc}"
    );
    assert!(plain >= float - 0.01, "{plain} vs {float}");
}

#[test]
fn power_of_two_scales_make_activation_tables_digit_reads() {
    use fhecam::fhe::eval::{plan_mode, InputMode};
    use fhecam::model::{Model, Op};
    let dir = tempfile::tempdir().unwrap();
    let m = import(dir.path(), "qcdq_nobias_pow2", &[]);
    let model: Model = serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
    let plan = |m: &Model| plan_mode(m, InputMode::DeviceClear).unwrap().0;
    // The same tables with every level change on the step (ties all rounding one way):
    // a pure read of digits, which the exact tables (ONNX rounds ties to even, so every
    // other change is one unit late) must match within one comparison of the digits
    // below the step.
    let mut read = model.clone();
    let infos = model.infer_values().unwrap();
    let mut checked = vec![];
    for (k, node) in read.nodes.iter_mut().enumerate() {
        let Op::Activation(act) = &mut node.op else {
            continue;
        };
        let mut below = 0;
        for t in &mut act.tables {
            let ch = t.thresholds();
            let step = (ch[ch.len() - 1] - ch[0]) / (ch.len() as i64 - 1);
            assert!(step.count_ones() == 1 && step >= 4, "{ch:?}");
            assert!(
                ch.windows(2).any(|w| w[1] - w[0] != step),
                "ties make the changes irregular: {ch:?}"
            );
            below = below.max(step.trailing_zeros() as u64 / 2);
            let first = ch[0];
            let (lo, top) = (t.values[0], *t.values.last().unwrap());
            let end = t.min + t.values.len() as i64 - 1;
            *t = fhecam::model::ActTable::from_fn(t.min, end, |x| {
                (lo as i64
                    + (0..ch.len() as i64)
                        .filter(|i| first + i * step <= x)
                        .count() as i64)
                    .min(top as i64) as u8
            });
        }
        checked.push((k, infos[k + 1].len() as u64, below));
    }
    assert_eq!(checked.len(), 2);
    let (exact, digits) = (plan(&model), plan(&read));
    for (k, n, below) in checked {
        let (exact, digits) = (exact[k], digits[k]);
        eprintln!(
            "node {k}: {exact} PBS exact, {digits} as a read of digits ({:.1} / {:.1} per activation)",
            exact as f64 / n as f64,
            digits as f64 / n as f64
        );
        assert!(
            exact <= digits + n * (below + 1),
            "node {k}: {exact} vs {digits}"
        );
    }
}

/// `fhecam plan M --input-mode device-clear`: PBS per frame and multiply-accumulates, from
/// its last line ("total N PBS for M multiply-accumulates …").
fn plan_device_clear(model: &str) -> (u64, u64) {
    let out = ok(&["plan", model, "--input-mode", "device-clear"]);
    let last = out.lines().last().unwrap_or_default();
    let words: Vec<&str> = last.split_whitespace().collect();
    match (words.get(1), words.get(4)) {
        (Some(pbs), Some(macs)) if words[0] == "total" => {
            (pbs.parse().unwrap(), macs.parse().unwrap())
        }
        _ => panic!("plan's last line: {last}"),
    }
}

/// The Brevitas recipe of examples/qat (issue 25): at least 0.95 under ONNX Runtime, the
/// integer model within half a point of it and on its class for at least 99 % of the test
/// images, at most 5,000 PBS per frame and 2.0 per MAC with device-clear input.
#[test]
fn the_recipe_models_are_cheap_and_exact() {
    let dir = tempfile::tempdir().unwrap();
    let recipe: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("recipe_predictions.json")).unwrap(),
    )
    .unwrap();
    let labels = npy::read_labels(Path::new(&fx("test_y.txt"))).unwrap();
    for name in ["recipe_cnn_2bit", "recipe_cnn_2bit_nobias"] {
        let ort = &recipe["models"][name];
        let ort_acc = ort["accuracy"].as_f64().unwrap();
        let ort_pred: Vec<usize> = serde_json::from_value(ort["predictions"].clone()).unwrap();
        assert!(ort_acc >= 0.95, "{name}: ONNX Runtime accuracy {ort_acc}");
        let m = import(dir.path(), name, &[]);
        let int = integer_predictions(&m);
        let (agree, acc) = (same(&int, &ort_pred), same(&int, &labels));
        assert!(agree >= 0.99, "{name}: same class on {agree}");
        assert!((acc - ort_acc).abs() <= 0.005, "{name}: {acc} vs {ort_acc}");
        let (pbs, macs) = plan_device_clear(&m);
        let per_mac = pbs as f64 / macs as f64;
        eprintln!("{name}: {pbs} PBS device-clear, {per_mac:.2} per MAC, accuracy {acc:.4}, same class {agree:.4}");
        assert!(
            pbs <= 5_000 && per_mac <= 2.0,
            "{name}: {pbs} PBS, {per_mac:.2} per MAC"
        );
    }
}

/// ONNX Runtime's own static quantization (QDQ) of a model without biases
/// (scripts/fold-fixtures.py): imported with its int8 weights as they are; its uint8
/// activations are merged to fhecam's 16 levels (a `note:` says so), so the class follows
/// ONNX Runtime's on most images rather than all.
#[test]
fn onnx_runtime_quantization_without_biases_imports() {
    let dir = tempfile::tempdir().unwrap();
    let name = "ort_qdq_nobias";
    let run = common::import_fixture(dir.path(), name);
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        said.contains("the model's own widths: weights 8 bits"),
        "{said}"
    );
    let out = dir.path().join(format!("{name}.json"));
    let (acc, pred) = fold_onnx_runtime(name);
    let int = integer_predictions(out.to_str().unwrap());
    let labels = npy::read_labels(Path::new(&fx("test_y.txt"))).unwrap();
    let (agree, int_acc) = (same(&int, &pred), same(&int, &labels));
    eprintln!("{name}: same class as ONNX Runtime {agree:.4}, accuracy {int_acc:.4} vs {acc:.4}");
    assert!(agree >= 0.95, "{name}: same class on {agree}");
    assert!((int_acc - acc).abs() <= 0.01, "{name}: {int_acc} vs {acc}");
}
