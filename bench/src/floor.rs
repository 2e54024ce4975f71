//! The engine's floor for a cold build with `--load` (issue 18): no builder outside the
//! engine can have the image there before each layer exists and the engine has taken it
//! and every layer above it (the engine registers a pull's layers in order, one after
//! another).

/// The earliest the engine can hold an image whose top layers, bottom to top, became
/// final at `final_at` seconds and take the engine `import` seconds each by themselves:
/// the largest, over the layers, of when one was final plus the imports of it and of every
/// layer above it. `None` when the two lists differ in length or are empty.
pub fn import_floor(final_at: &[f64], import: &[f64]) -> Option<f64> {
    if final_at.is_empty() || final_at.len() != import.len() {
        return None;
    }
    let mut above = 0.0;
    let mut floor: f64 = 0.0;
    for (t, l) in final_at.iter().zip(import).rev() {
        above += l;
        floor = floor.max(t + above);
    }
    Some(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_the_latest_layer_plus_the_imports_above_it() {
        // A big layer final early, imported slowly, and a small one at the end: the big
        // one's import (and the small one's after it) bounds the load.
        assert_eq!(import_floor(&[2.0, 5.0], &[4.0, 0.5]), Some(6.5));
        // The last layer final late dominates.
        assert_eq!(import_floor(&[1.0, 9.0], &[1.0, 2.0]), Some(11.0));
        assert_eq!(import_floor(&[1.0], &[]), None);
        assert_eq!(import_floor(&[], &[]), None);
    }
}
