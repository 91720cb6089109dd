//! A named parameter tensor with its gradient.

/// One trainable tensor. Names follow the Hugging Face Llama convention
/// (`model.layers.3.self_attn.q_proj.weight`) so checkpoints export by name.
/// Matrices are stored row-major as `[out, in]`, like `torch.nn.Linear`.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// Hugging Face style name.
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
    /// Accumulated gradient, same length as `data`.
    pub grad: Vec<f32>,
    /// Whether AdamW applies weight decay (matrices yes, norm gains no).
    pub decay: bool,
}

impl Param {
    /// A parameter filled with `value`, with a zero gradient.
    pub fn filled(name: impl Into<String>, shape: &[usize], value: f32, decay: bool) -> Self {
        let n = shape.iter().product();
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            data: vec![value; n],
            grad: vec![0.0; n],
            decay,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Set the gradient to zero.
    pub fn zero_grad(&mut self) {
        self.grad.iter_mut().for_each(|g| *g = 0.0);
    }
}
