//! The prefix cache: what a model computed for token prefixes already seen (its keys and
//! values), kept across jobs and batches so a few-shot prefix or a question shared by its options
//! is computed once. A radix tree of token sequences (as SGLang's RadixAttention): each node holds
//! the payload of its edge's tokens, a lookup returns the longest cached prefix of a sequence,
//! bounded in bytes with the least recently used leaves evicted first.
//!
//! Plain Rust: the payload is the backend's ([`Segment`]: per-layer key/value tensors on the engine
//! thread, plain vectors in the tests), so the tree is tested without torch.
//!
//! Exactness rests on causality: the keys and values at position `i` depend only on tokens
//! `0..=i`, so any cached sequence that starts with the same `n` tokens holds the first `n`
//! positions of every sequence with that prefix. A backend whose keys depend on more than the
//! prefix (positions scaled by the row's length, as LongRoPE does) must not use it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// The budget of a model's cache when its own configuration sets none (bytes).
static DEFAULT_BUDGET: AtomicU64 = AtomicU64::new(DEFAULT_PREFIX_CACHE_MB << 20);

/// `--prefix-cache-mb`'s default.
pub const DEFAULT_PREFIX_CACHE_MB: u64 = 512;

/// Sets the budget of every model's prefix cache whose configuration sets none (from the CLI).
pub fn configure_prefix_cache(bytes: u64) {
    DEFAULT_BUDGET.store(bytes, Ordering::Relaxed);
}

pub(crate) fn default_budget() -> u64 {
    DEFAULT_BUDGET.load(Ordering::Relaxed)
}

/// A node's payload: `len` tokens' worth of computed state.
pub trait Segment: Sized {
    /// The first `at` tokens and the rest, each on its own storage (so evicting one frees it).
    fn split(self, at: usize) -> (Self, Self);
}

/// What the cache did, for metrics (counters since it was made, and its size now).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Tokens asked for by lookups, and how many of them were served from the cache.
    pub looked_up: u64,
    pub hit: u64,
    /// Tokens stored, and evicted to stay within the budget.
    pub inserted: u64,
    pub evicted: u64,
    /// Bytes held now.
    pub bytes: u64,
}

struct Node<V> {
    /// The edge's tokens (the root's: none).
    tokens: Vec<u32>,
    value: Option<V>,
    /// By first token.
    children: HashMap<u32, usize>,
    parent: usize,
    last_used: u64,
}

/// The longest cached prefix of a sequence: nodes along the path, each with how many of its
/// tokens the sequence uses (all but possibly the last node's).
pub struct Hit<'a, V> {
    pub len: usize,
    pub parts: Vec<(&'a V, usize)>,
}

const ROOT: usize = 0;

pub struct PrefixTree<V> {
    nodes: Vec<Option<Node<V>>>,
    free: Vec<usize>,
    token_bytes: u64,
    budget: u64,
    clock: u64,
    stats: PrefixStats,
}

impl<V: Segment> PrefixTree<V> {
    /// A cache of at most `budget` bytes, each token taking `token_bytes`.
    pub fn new(budget: u64, token_bytes: u64) -> PrefixTree<V> {
        let root = Node { tokens: Vec::new(), value: None, children: HashMap::new(), parent: ROOT, last_used: 0 };
        PrefixTree { nodes: vec![Some(root)], free: Vec::new(), token_bytes, budget, clock: 0, stats: PrefixStats::default() }
    }

    /// Whether anything can be cached at all.
    pub fn enabled(&self) -> bool {
        self.token_bytes > 0 && self.budget >= self.token_bytes
    }

    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    fn node(&self, id: usize) -> &Node<V> {
        self.nodes[id].as_ref().expect("a live node")
    }

    fn node_mut(&mut self, id: usize) -> &mut Node<V> {
        self.nodes[id].as_mut().expect("a live node")
    }

    /// The path matching `tokens`: (node, tokens of it matched), the last possibly partly.
    fn walk(&self, tokens: &[u32]) -> Vec<(usize, usize)> {
        let mut path = Vec::new();
        let (mut at, mut done) = (ROOT, 0);
        while let Some(&child) = tokens.get(done).and_then(|t| self.node(at).children.get(t)) {
            let edge = &self.node(child).tokens;
            let common = edge.iter().zip(&tokens[done..]).take_while(|(a, b)| a == b).count();
            path.push((child, common));
            done += common;
            if common < edge.len() {
                break;
            }
            at = child;
        }
        path
    }

    /// How many leading tokens of `tokens` are cached, without counting it as a use.
    pub fn cached_len(&self, tokens: &[u32]) -> usize {
        self.walk(tokens).iter().map(|&(_, n)| n).sum()
    }

    /// The longest cached prefix of `tokens`; marks it used.
    pub fn lookup(&mut self, tokens: &[u32]) -> Hit<'_, V> {
        let path = self.walk(tokens);
        self.clock += 1;
        for &(id, _) in &path {
            let clock = self.clock;
            self.node_mut(id).last_used = clock;
        }
        let len = path.iter().map(|&(_, n)| n).sum();
        self.stats.looked_up += tokens.len() as u64;
        self.stats.hit += len as u64;
        Hit { len, parts: path.into_iter().map(|(id, n)| (self.node(id).value.as_ref().expect("a non-root node has a value"), n)).collect() }
    }

    /// Stores `tokens`: what is not cached yet becomes one new leaf, whose payload `value(from)`
    /// makes for `tokens[from..]` (`None`: it cannot, nothing is stored). A sequence larger than
    /// the whole budget is not stored. Then evicts least recently used leaves down to the budget.
    pub fn insert(&mut self, tokens: &[u32], value: impl FnOnce(usize) -> Option<V>) {
        if !self.enabled() || tokens.len() as u64 * self.token_bytes > self.budget {
            return;
        }
        self.clock += 1;
        let clock = self.clock;
        let path = self.walk(tokens);
        let mut parent = ROOT;
        let mut done = 0;
        for &(id, n) in &path {
            let id = if n < self.node(id).tokens.len() { self.split(id, n) } else { id };
            self.node_mut(id).last_used = clock;
            (parent, done) = (id, done + n);
        }
        if done == tokens.len() {
            return;
        }
        let Some(value) = value(done) else { return };
        let id = self.alloc(Node { tokens: tokens[done..].to_vec(), value: Some(value), children: HashMap::new(), parent, last_used: clock });
        self.node_mut(parent).children.insert(tokens[done], id);
        let added = (tokens.len() - done) as u64;
        self.stats.inserted += added;
        self.stats.bytes += added * self.token_bytes;
        while self.stats.bytes > self.budget {
            self.evict_one();
        }
    }

    /// Splits node `id` after `at` of its tokens: a new node with those takes its place, `id`
    /// keeps the rest below it. Returns the new node.
    fn split(&mut self, id: usize, at: usize) -> usize {
        let node = self.node_mut(id);
        let tail = node.tokens.split_off(at);
        let (head_value, tail_value) = node.value.take().expect("a non-root node has a value").split(at);
        let head = Node { tokens: std::mem::replace(&mut node.tokens, tail), value: Some(head_value), children: HashMap::new(), parent: node.parent, last_used: node.last_used };
        node.value = Some(tail_value);
        let parent = node.parent;
        let first_of_tail = node.tokens[0];
        let head_id = self.alloc(head);
        self.node_mut(head_id).children.insert(first_of_tail, id);
        self.node_mut(id).parent = head_id;
        let first = self.node(head_id).tokens[0];
        self.node_mut(parent).children.insert(first, head_id);
        head_id
    }

    /// Stores `node` in a free slot (or a new one); its id.
    fn alloc(&mut self, node: Node<V>) -> usize {
        match self.free.pop() {
            Some(id) => {
                self.nodes[id] = Some(node);
                id
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        }
    }

    /// Drops the least recently used leaf.
    fn evict_one(&mut self) {
        let leaf = self
            .nodes
            .iter()
            .enumerate()
            .skip(1)
            .filter_map(|(i, n)| n.as_ref().filter(|n| n.children.is_empty()).map(|n| (n.last_used, i)))
            .min()
            .map(|(_, i)| i);
        let Some(id) = leaf else { return };
        let node = self.nodes[id].take().expect("a live node");
        self.free.push(id);
        self.node_mut(node.parent).children.remove(&node.tokens[0]);
        let n = node.tokens.len() as u64;
        self.stats.evicted += n;
        self.stats.bytes -= n * self.token_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload that is its tokens, so splits and hits can be checked.
    #[derive(Debug, PartialEq)]
    struct Toks(Vec<u32>);

    impl Segment for Toks {
        fn split(mut self, at: usize) -> (Toks, Toks) {
            let tail = self.0.split_off(at);
            (self, Toks(tail))
        }
    }

    fn tree(budget_tokens: u64) -> PrefixTree<Toks> {
        PrefixTree::new(budget_tokens * 4, 4)
    }

    fn put(t: &mut PrefixTree<Toks>, tokens: &[u32]) {
        t.insert(tokens, |from| Some(Toks(tokens[from..].to_vec())));
    }

    /// The tokens a hit's parts hold, joined.
    fn held(t: &mut PrefixTree<Toks>, tokens: &[u32]) -> Vec<u32> {
        let hit = t.lookup(tokens);
        let out: Vec<u32> = hit.parts.iter().flat_map(|(v, n)| v.0[..*n].to_vec()).collect();
        assert_eq!(out.len(), hit.len);
        out
    }

    #[test]
    fn a_lookup_returns_the_longest_cached_prefix_from_the_nodes_that_hold_it() {
        let mut t = tree(100);
        put(&mut t, &[1, 2, 3, 4, 5]);
        assert_eq!(held(&mut t, &[1, 2, 3, 9]), vec![1, 2, 3], "a partial edge serves its first tokens");
        assert_eq!(held(&mut t, &[7, 1, 2]), Vec::<u32>::new());
        // A branch splits the edge; both branches are then served whole.
        put(&mut t, &[1, 2, 3, 8, 8, 8]);
        assert_eq!(held(&mut t, &[1, 2, 3, 8, 8, 8, 0]), vec![1, 2, 3, 8, 8, 8]);
        assert_eq!(held(&mut t, &[1, 2, 3, 4, 5]), vec![1, 2, 3, 4, 5]);
        assert_eq!(t.cached_len(&[1, 2, 3, 8, 0]), 4);
        // Stored once: 5 + 3 tokens.
        assert_eq!(t.stats().bytes, 8 * 4);
        assert_eq!(t.stats().inserted, 8);
        // Inserting what is cached stores nothing and never asks for a payload.
        t.insert(&[1, 2, 3], |_| panic!("nothing new"));
        assert_eq!(t.stats().inserted, 8);
        let s = t.stats();
        assert_eq!((s.looked_up, s.hit), (4 + 3 + 7 + 5, 3 + 6 + 5));
    }

    #[test]
    fn the_least_recently_used_leaves_go_first_and_shared_prefixes_stay() {
        let mut t = tree(10);
        put(&mut t, &[1, 1, 1, 1, 2, 2]); // shared prefix [1; 4], leaf [2, 2]
        put(&mut t, &[1, 1, 1, 1, 3, 3]); // leaf [3, 3]: 8 tokens
        assert_eq!(t.stats().bytes, 8 * 4);
        let _ = t.lookup(&[1, 1, 1, 1, 2, 2]); // [2, 2] is now newer than [3, 3]
        put(&mut t, &[1, 1, 1, 1, 4, 4, 4]); // 11 tokens: [3, 3] goes
        assert_eq!(t.stats().evicted, 2);
        assert_eq!(t.cached_len(&[1, 1, 1, 1, 3, 3]), 4);
        assert_eq!(t.cached_len(&[1, 1, 1, 1, 2, 2]), 6);
        assert_eq!(t.cached_len(&[1, 1, 1, 1, 4, 4, 4]), 7);
        assert!(t.stats().bytes <= 10 * 4);
        // A sequence larger than the budget is not stored, and evicts nothing.
        put(&mut t, &[5; 11]);
        assert_eq!(t.cached_len(&[5; 11]), 0);
        assert_eq!(t.stats().evicted, 2);
        // Leaves go before the prefix they hang from; the prefix goes once it is a leaf itself.
        put(&mut t, &[6; 10]);
        assert_eq!(t.cached_len(&[1, 1, 1, 1, 2, 2]), 0);
        assert_eq!(t.cached_len(&[6; 10]), 10);
        assert_eq!(t.stats().bytes, 10 * 4);
    }

    #[test]
    fn a_payload_that_cannot_be_made_stores_nothing_and_a_disabled_cache_nothing_at_all() {
        let mut t = tree(100);
        put(&mut t, &[1, 2]);
        t.insert(&[1, 2, 3, 4], |from| {
            assert_eq!(from, 2);
            None
        });
        assert_eq!(t.cached_len(&[1, 2, 3, 4]), 2);
        let mut off: PrefixTree<Toks> = PrefixTree::new(0, 4);
        assert!(!off.enabled());
        put(&mut off, &[1, 2]);
        assert_eq!(off.cached_len(&[1, 2]), 0);
    }

    #[test]
    fn random_inserts_and_lookups_agree_with_a_plain_list_of_what_is_cached() {
        // Against a model: a hit is the longest common prefix with some cached sequence, and its
        // payload is exactly those tokens. No eviction here (a large budget).
        let mut t = tree(1 << 20);
        let mut all: Vec<Vec<u32>> = Vec::new();
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..400 {
            let base = if all.is_empty() || next(3) == 0 { Vec::new() } else { all[next(all.len() as u64) as usize].clone() };
            let keep = if base.is_empty() { 0 } else { next(base.len() as u64 + 1) as usize };
            let mut s: Vec<u32> = base[..keep].to_vec();
            s.extend((0..1 + next(6)).map(|_| next(3) as u32));
            if next(2) == 0 {
                let expect = all.iter().map(|a| a.iter().zip(&s).take_while(|(x, y)| x == y).count()).max().unwrap_or(0);
                assert_eq!(held(&mut t, &s), s[..expect].to_vec());
            } else {
                put(&mut t, &s);
                all.push(s);
            }
        }
    }
}
