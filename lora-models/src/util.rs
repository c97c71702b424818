//! Small helpers shared by the model files: dimension checks with context, activations.

use tch::Tensor;

/// The dims of a 4-D tensor, panicking with the module name when the rank is wrong.
///
/// Forward passes cannot return errors (tch's `Module` trait); a wrong rank here is a caller bug.
#[track_caller]
pub(crate) fn dims4(xs: &Tensor, module: &str) -> (i64, i64, i64, i64) {
    match xs.size()[..] {
        [b, c, h, w] => (b, c, h, w),
        ref other => panic!("{module}: expected a [b, c, h, w] input, got {other:?}"),
    }
}

/// The dims of a 3-D tensor, panicking with the module name when the rank is wrong.
#[track_caller]
pub(crate) fn dims3(xs: &Tensor, module: &str) -> (i64, i64, i64) {
    match xs.size()[..] {
        [b, n, c] => (b, n, c),
        ref other => panic!("{module}: expected a [b, seq, c] input, got {other:?}"),
    }
}
