//! The weight half of a backward in groups of parameters, reported as each
//! group completes: the caller can start averaging a group's gradients with
//! the other replicas while the rest of the backward still runs.

use super::{BlockSaved, Param, Stage, StageError};

impl Stage {
    /// Indices into [`Stage::params`] of the groups of parameters whose
    /// gradients [`Stage::backward_weight_each`] completes together, in the
    /// order it completes them: the head with the down-projection, each
    /// block from the last to the first, then the up-projection with the
    /// embedding. Empty groups are left out.
    pub fn weight_groups(&self) -> Vec<Vec<usize>> {
        let front = usize::from(self.embed.is_some()) + usize::from(self.up.is_some());
        let mut at = front;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let n = b.params().len();
            blocks.push((at..at + n).collect::<Vec<_>>());
            at += n;
        }
        let down = self.down.as_ref().map(|_| {
            at += 1;
            at - 1
        });
        let head = self.head.as_ref().map(|_| [at, at + 1]);
        let mut groups = Vec::with_capacity(blocks.len() + 2);
        let tail: Vec<usize> = head.into_iter().flatten().chain(down).collect();
        if !tail.is_empty() {
            groups.push(tail);
        }
        groups.extend(blocks.into_iter().rev());
        // The up-projection (index 1 after an embedding, else 0) finishes
        // before the embedding (index 0).
        let first: Vec<usize> = match (self.embed.is_some(), self.up.is_some()) {
            (true, true) => vec![1, 0],
            (true, false) | (false, true) => vec![0],
            (false, false) => Vec::new(),
        };
        if !first.is_empty() {
            groups.push(first);
        }
        groups
    }

    /// [`Stage::backward_weight`], calling `done` with each group of
    /// [`Stage::weight_groups`] (its parameters, in the group's order) as
    /// soon as its gradients are complete.
    pub fn backward_weight_each(
        &mut self,
        mb: u64,
        done: &mut dyn FnMut(&[&Param]),
    ) -> Result<(), StageError> {
        match self.inflight.get(&mb) {
            None => return Err(StageError::UnknownMicroBatch(mb)),
            Some(c) if !c.input_done => return Err(StageError::OutOfOrder(mb)),
            Some(_) => {}
        }
        let cache = self
            .inflight
            .remove(&mb)
            .ok_or(StageError::UnknownMicroBatch(mb))?;
        if let (Some(head), Some(c)) = (self.head.as_mut(), cache.head.as_ref()) {
            head.backward_weight(c);
        }
        if let (Some(down), Some(c)) = (self.down.as_mut(), cache.down.as_ref()) {
            down.backward_weight(c);
        }
        let tail: Vec<&Param> = self
            .head
            .iter()
            .flat_map(|h| [&h.norm.weight, &h.weight])
            .chain(self.down.iter().map(|d| &d.weight))
            .collect();
        if !tail.is_empty() {
            done(&tail);
        }
        for (block, saved) in self.blocks.iter_mut().zip(&cache.blocks).rev() {
            // Under recomputation the input half already ran the block's
            // weight half.
            if let BlockSaved::All(c) = saved {
                block.backward_weight(c);
            }
            done(&block.params());
        }
        if let (Some(up), Some(c)) = (self.up.as_mut(), cache.up.as_ref()) {
            up.backward_weight(c);
        }
        if let Some(embed) = self.embed.as_mut() {
            embed.backward_weight(&cache.tokens, &cache.dembed);
        }
        let first: Vec<&Param> = self
            .up
            .iter()
            .map(|u| &u.weight)
            .chain(self.embed.iter().map(|e| &e.weight))
            .collect();
        if !first.is_empty() {
            done(&first);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{ModelConfig, Stage, StageInput};

    fn cfg() -> ModelConfig {
        ModelConfig {
            vocab: 40,
            dim: 16,
            layers: 3,
            heads: 4,
            kv_heads: 2,
            ffn_dim: 24,
            seq_len: 8,
            tied: false,
            rope_theta: 1e4,
            norm_eps: 1e-5,
            init_std: 0.02,
        }
    }

    /// Runs one micro-batch forward and input-backward on every stage of a
    /// 3-stage split, then checks that the grouped weight half reports
    /// every parameter once, in `weight_groups` order, with the gradients
    /// the plain weight half computes.
    #[test]
    fn grouped_weight_gradients_cover_every_parameter_in_order() {
        let cfg = cfg();
        let tokens: Vec<u32> = (0..16).map(|i| (i * 7 % 40) as u32).collect();
        let targets: Vec<u32> = (0..16).map(|i| (i * 3 % 40) as u32).collect();
        let build = || -> Vec<Stage> {
            [0..1, 1..2, 2..3]
                .into_iter()
                .enumerate()
                .map(|(i, l)| Stage::new(&cfg, i, 3, l, 9))
                .collect()
        };
        let run = |stages: &mut Vec<Stage>| {
            let mut h: Option<Vec<f32>> = None;
            for (i, s) in stages.iter_mut().enumerate() {
                let input = match &h {
                    None => StageInput::Tokens(&tokens),
                    Some(x) => StageInput::Hidden(x),
                };
                let last = i == 2;
                match s
                    .forward(0, input, last.then_some(&targets[..]), 2, 1.0)
                    .expect("forward")
                {
                    crate::model::StageOutput::Hidden(x) => h = Some(x),
                    crate::model::StageOutput::Loss(_) => {}
                }
            }
            let mut g: Option<Vec<f32>> = None;
            for s in stages.iter_mut().rev() {
                g = s.backward_input(0, g.as_deref()).expect("backward");
            }
        };
        let mut plain = build();
        run(&mut plain);
        let mut grouped = build();
        run(&mut grouped);
        for (p, q) in plain.iter_mut().zip(grouped.iter_mut()) {
            p.backward_weight(0).expect("weight");
            let groups = q.weight_groups();
            let names: Vec<String> = q.params().iter().map(|x| x.name.clone()).collect();
            let mut seen: Vec<Vec<String>> = Vec::new();
            let mut grads: Vec<(String, Vec<f32>)> = Vec::new();
            q.backward_weight_each(0, &mut |params| {
                seen.push(params.iter().map(|x| x.name.clone()).collect());
                grads.extend(params.iter().map(|x| (x.name.clone(), x.grad.clone())));
            })
            .expect("grouped weight");
            let want: Vec<Vec<String>> = groups
                .iter()
                .map(|g| g.iter().map(|&i| names[i].clone()).collect())
                .collect();
            assert_eq!(seen, want, "stage {}", q.index);
            let mut all: Vec<&String> = seen.iter().flatten().collect();
            all.sort();
            let mut every: Vec<&String> = names.iter().collect();
            every.sort();
            assert_eq!(all, every, "every parameter exactly once");
            for (name, g) in grads {
                let p = p
                    .params()
                    .into_iter()
                    .find(|x| x.name == name)
                    .expect("param");
                assert_eq!(p.grad, g, "{name}");
            }
        }
    }
}
