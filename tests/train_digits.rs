//! Trains on the real digits set and checks the exported integer model against the
//! fake-quantized float network it came from.

use fhecam::data::{load_digits, stratified_split};
use fhecam::reference;
use fhecam::train::{train, TrainConfig};

#[test]
fn short_training_exports_a_consistent_integer_model() {
    // A missing data file is a setup error, not a reason to skip.
    let ds = load_digits().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ds.len(), 1797);
    let (tr, te) = stratified_split(&ds, 0.25, 42);
    let cfg = TrainConfig {
        epochs: 20,
        ..TrainConfig::default()
    };
    let report = train(&cfg, &tr, &te, &|_, _| {}).expect("training");
    eprintln!(
        "float {:.4} plain {:.4} in {:.1}s",
        report.scores.accuracy_float, report.scores.accuracy_plain, report.scores.train_seconds
    );

    let infos = report.model.infer().expect("exported model is valid");
    assert_eq!(infos.last().unwrap().len(), 10);
    assert_eq!(report.scores.test_samples, te.len());
    assert_eq!(report.train_samples, tr.len());
    assert!(
        report.scores.accuracy_plain >= 0.90,
        "plain accuracy {}",
        report.scores.accuracy_plain
    );

    // The integer model recomputed here must agree with the report and, sample by sample,
    // with the float network.
    let plain: Vec<usize> = te
        .images
        .iter()
        .map(|img| {
            let logits = reference::evaluate(&report.model, &report.model.input.quantize(img))
                .expect("reference evaluation");
            reference::argmax(&logits)
        })
        .collect();
    assert_eq!(plain, report.scores.predictions_plain);
    let agree = plain
        .iter()
        .zip(&report.scores.predictions_float)
        .filter(|(a, b)| a == b)
        .count() as f64
        / te.len() as f64;
    assert!(agree >= 0.97, "float/integer argmax agreement {agree}");

    // The model survives a serde round trip unchanged.
    let json = serde_json::to_string(&report.model).unwrap();
    let back: fhecam::model::Model = serde_json::from_str(&json).unwrap();
    assert_eq!(back, report.model);
}
