//! `WorkerClient`: AkiDB's embedding calls over a pool of supervised workers (one by default;
//! see the crate docs for the whole data path).
//!
//! This file turns calls into wire requests and replies into results: a batch is checked,
//! sorted shortest first, cut into chunks the workers accept (`chunking.rs`, with each chunk's
//! estimated tokens), each chunk handed to the [`Dispatcher`] (which writes it to the least-loaded
//! worker, and again to another if that one dies or hangs), and the replies' rows are moved
//! back to the caller's order.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::chunking::{shortest_first, ChunkPlan};
use crate::config::WorkerConfig;
use crate::dispatch::{ClientStats, Dispatcher, PendingReply};
use crate::types::{
    BatchEmbeddingRequest, BatchEmbeddingResponse, EmbedOptions, EmbeddingError, EmbeddingProvider,
    EmbeddingResult, EncodedEmbeddings, EncodedValues, Encoding, FlatEmbeddings, ModelDescription,
    ModelInfo, RequestTrace, TracedEmbedding, TruncationSide, Usage, EMPTY_BATCH_MESSAGE,
};
use crate::wire::{
    self, EmbedReply, EmbedRequest, HealthReply, OpRequest, RangesReply, RangesRequest, ReadyHello,
    ReplyEnvelope, TokenizeReply, TokenizeRequest,
};

/// AkiDB's embedding calls served by a pool of supervised `akidb-embed` worker processes
/// (`WorkerConfig::workers`, one by default), every one holding every model.
///
/// Cheap to clone: clones share the pool. Calls from many tasks are pipelined over it, and
/// may come from any runtime: the supervisor runs on the tokio runtime that called
/// [`spawn`](Self::spawn), and while that runtime is up every call is served; once it shuts
/// down, every call (and [`model_info`](Self::model_info)) fails at once with
/// `ServiceUnavailable`. The workers are stopped when [`close`](Self::close) is awaited or the
/// last clone is dropped; they are spawned with `kill_on_drop`, so not even a runtime shutdown
/// leaves one running.
#[derive(Clone)]
pub struct WorkerClient {
    service: Arc<Dispatcher>,
}

impl WorkerClient {
    /// Starts `config.workers` workers in parallel and waits for every hello: the pool is
    /// ready when all are. Fails fast, without retrying, when a worker cannot start (the
    /// others are stopped): `ModelNotFound` or `ServiceUnavailable` with that worker's own
    /// reason (its failed hello, or its exit status and the last lines of its stderr),
    /// `ModelNotFound` when its default model is not `config.expected_model`.
    ///
    /// Must be called inside a tokio runtime (with I/O and time enabled): the supervisor and
    /// the worker's I/O are tasks of that runtime, which must keep running for the client to
    /// be served.
    pub async fn spawn(config: WorkerConfig) -> EmbeddingResult<Self> {
        Ok(Self { service: Arc::new(Dispatcher::start(config).await?) })
    }

    /// Embeds every input, in order, with the worker's defaults for what AkiDB's request does
    /// not say (see [`embed_batch_with`](Self::embed_batch_with)).
    pub async fn embed_batch(
        &self,
        request: BatchEmbeddingRequest,
    ) -> EmbeddingResult<BatchEmbeddingResponse> {
        self.embed_batch_with(request, &EmbedOptions::default()).await
    }

    /// Embeds every input, in order, with a prompt name or truncation choice. An empty
    /// `inputs` is `InvalidInput("empty input batch")`, as AkiDB's providers answer. The texts
    /// go out shortest first (by UTF-8 bytes; ties keep the caller's order), split into wire
    /// requests that fit the worker's limits (texts per request, frame size),
    /// `max_in_flight_texts`, and about four of the worker's ONNX Runtime batches of estimated
    /// tokens (so that a busy worker answers something every few seconds and is not taken for
    /// a hung one). Each reply's vectors are put back at their texts' positions; see [`Usage`]
    /// for how the replies' usage adds up. An `InvalidInput` about one text starts with
    /// `inputs[i]`, `i` its position in `request.inputs`.
    pub async fn embed_batch_with(
        &self,
        request: BatchEmbeddingRequest,
        options: &EmbedOptions,
    ) -> EmbeddingResult<BatchEmbeddingResponse> {
        Ok(self.embed_vectors(request, options, false).await?.response)
    }

    /// [`embed_batch_with`](Self::embed_batch_with), traced: each wire request asks the worker
    /// for its stage marks (`trace: true`, protocol.md `embed`) and comes back with them and
    /// the client's own stage durations ([`RequestTrace`]). For measuring where a request's
    /// time goes, a lone query above all; the vectors are the same as untraced. The worker
    /// encodes a traced reply twice (to time its encoding), so tracing costs a little.
    pub async fn embed_traced(
        &self,
        request: BatchEmbeddingRequest,
        options: &EmbedOptions,
    ) -> EmbeddingResult<TracedEmbedding> {
        self.embed_vectors(request, options, true).await
    }

    async fn embed_vectors(
        &self,
        request: BatchEmbeddingRequest,
        options: &EmbedOptions,
        traced: bool,
    ) -> EmbeddingResult<TracedEmbedding> {
        // Empty vectors do not allocate; each is replaced by its row.
        let mut embeddings = vec![Vec::new(); request.inputs.len()];
        let (model, usage, traces) = self
            .embed_rows(request, options, None, traced, |caller_index, row, dimension| {
                let vector = &mut embeddings[caller_index];
                vector.reserve_exact(dimension);
                wire::decode_row(row, vector);
                Ok(())
            })
            .await?;
        Ok(TracedEmbedding {
            response: BatchEmbeddingResponse { model, embeddings, usage },
            traces,
        })
    }

    /// [`embed_batch_with`](Self::embed_batch_with) with every vector in one buffer.
    pub async fn embed_flat(
        &self,
        request: BatchEmbeddingRequest,
        options: &EmbedOptions,
    ) -> EmbeddingResult<FlatEmbeddings> {
        let texts = request.inputs.len();
        let mut values = Vec::new();
        let mut known_dimension = None;
        let (model, usage, _) = self
            .embed_rows(request, options, None, false, |caller_index, row, dimension| {
                if *known_dimension.get_or_insert(dimension) != dimension {
                    return Err(wire::protocol_violation("replies of different dimensions"));
                }
                if values.is_empty() {
                    values = vec![0.0; texts * dimension];
                }
                let start = caller_index * dimension;
                wire::decode_row_into(row, &mut values[start..start + dimension]);
                Ok(())
            })
            .await?;
        let dimension = known_dimension.unwrap_or_default();
        Ok(FlatEmbeddings { model, dimension, values, usage })
    }

    /// [`embed_batch_with`](Self::embed_batch_with) with the vectors in `encoding`
    /// (protocol.md, `encoding`): half floats, scalar codes over the model's calibrated ranges,
    /// or packed sign bits as sentence-transformers' `quantize_embeddings`, typed by encoding
    /// in one row-major buffer. `InvalidInput` naming the field for a `dimensions` the model or
    /// the encoding cannot take, or int8/uint8 for a model without calibration vectors.
    pub async fn embed_encoded(
        &self,
        request: BatchEmbeddingRequest,
        options: &EmbedOptions,
        encoding: Encoding,
    ) -> EmbeddingResult<EncodedEmbeddings> {
        let texts = request.inputs.len();
        let mut values = EncodedValues::with_capacity(encoding, 0);
        let mut known_width = None;
        let (model, usage, _) = self
            .embed_rows(request, options, Some(encoding), false, |caller_index, row, width| {
                if *known_width.get_or_insert(width) != width {
                    return Err(wire::protocol_violation("replies of different widths"));
                }
                values.put_row(caller_index * width, texts * width, row);
                Ok(())
            })
            .await?;
        let width = known_width.unwrap_or_default();
        Ok(EncodedEmbeddings { model, encoding, width, values, usage })
    }

    /// The token ids each input would run with (special tokens and the prompt included, cut
    /// to `max_tokens` unless `options.truncate` is `Some(false)`, which refuses an over-long
    /// input with `InvalidInput`), without embedding: the `tokenize` op. `model` as in
    /// [`BatchEmbeddingRequest::model`]; `options.dimensions` plays no part.
    pub async fn tokenize(
        &self,
        model: &str,
        inputs: Vec<String>,
        options: &EmbedOptions,
    ) -> EmbeddingResult<Vec<Vec<u32>>> {
        if inputs.is_empty() {
            return Err(EmbeddingError::InvalidInput(EMPTY_BATCH_MESSAGE.into()));
        }
        let plan = self.plan(model, options)?;
        plan.check_text_sizes(&inputs)?;
        let wire_model = wire_model(model);
        let mut replies = Vec::new();
        for range in plan.split(&inputs) {
            let chunk = &inputs[range.clone()];
            let pending = self
                .submit_without_texts(true, |id| TokenizeRequest {
                    id,
                    op: TokenizeRequest::OP,
                    model: wire_model,
                    inputs: chunk,
                    prompt_name: options.prompt_name.as_deref(),
                    truncate: options.truncate,
                    truncation_side: options.truncation_side.map(TruncationSide::as_str),
                })
                .await?;
            replies.push((range, pending));
        }
        let mut ids = Vec::with_capacity(inputs.len());
        for (range, pending) in replies {
            let payload = pending.wait().await?;
            let first = range.start;
            wire::decode_payload::<ReplyEnvelope>(&payload)?
                .into_embed_result(range.len(), |index| first + index)?;
            let reply: TokenizeReply = wire::decode_payload(&payload)?;
            if reply.ids.len() != range.len() {
                return Err(wire::protocol_violation(&format!(
                    "{} token lists for {} inputs",
                    reply.ids.len(),
                    range.len()
                )));
            }
            ids.extend(reply.ids);
        }
        Ok(ids)
    }

    /// The per-dimension `(min, max)` that [`Encoding::Int8`] and [`Encoding::Uint8`] codes of
    /// an embed of `model` with `dimensions` and `normalize` (`None`: the model's default) are
    /// cut over: a code `c` of int8 maps back to `min + (c + 128) * (max - min) / 255`. Compare
    /// codes that way, not by their raw dot product.
    pub async fn quantization_ranges(
        &self,
        model: &str,
        dimensions: Option<u32>,
        normalize: Option<bool>,
    ) -> EmbeddingResult<(Vec<f32>, Vec<f32>)> {
        let wire_model = wire_model(model);
        let pending = self
            .submit_without_texts(true, |id| RangesRequest {
                id,
                op: RangesRequest::OP,
                model: wire_model,
                dimensions,
                normalize,
            })
            .await?;
        let payload = pending.wait().await?;
        wire::decode_payload::<ReplyEnvelope>(&payload)?.into_result()?;
        let reply: RangesReply<'_> = wire::decode_payload(&payload)?;
        let (rows, width) = reply.shape;
        if rows != 2 {
            return Err(wire::protocol_violation(&format!("ranges of {rows} rows")));
        }
        let mut bounds = wire::embedding_rows(reply.ranges, 2, width)?.map(|row| {
            let mut values = Vec::with_capacity(width);
            wire::decode_row(row, &mut values);
            values
        });
        let minimum = bounds.next().unwrap_or_default();
        Ok((minimum, bounds.next().unwrap_or_default()))
    }

    /// How many tokens each input would run with; see [`tokenize`](Self::tokenize).
    pub async fn count_tokens(
        &self,
        model: &str,
        inputs: Vec<String>,
        options: &EmbedOptions,
    ) -> EmbeddingResult<Vec<usize>> {
        Ok(self.tokenize(model, inputs, options).await?.iter().map(Vec::len).collect())
    }

    /// How a batch for `model` with `options` is cut into wire requests, from the latest hello.
    fn plan(&self, model: &str, options: &EmbedOptions) -> EmbeddingResult<ChunkPlan> {
        let hello = self.service.hello()?;
        // an unknown model is the worker's to refuse; its reply is small, any plan fits
        let served = hello.find_model(model).unwrap_or(&hello.models[0]);
        Ok(ChunkPlan::new(
            &hello.limits,
            served,
            self.service.config().max_in_flight_texts,
            wire_model(model),
            options.prompt_name.as_deref(),
        ))
    }

    /// The embedding calls' one path: checks, sorts and splits the batch, submits its chunks,
    /// and hands each reply's rows to `place` with the caller's index of their text and the
    /// row's width (values); returns the serving model, the summed usage, and when `traced`,
    /// each wire request's trace. `encoding` `None`: float32, not named on the wire.
    async fn embed_rows(
        &self,
        request: BatchEmbeddingRequest,
        options: &EmbedOptions,
        encoding: Option<Encoding>,
        traced: bool,
        mut place: impl FnMut(usize, &[u8], usize) -> EmbeddingResult<()>,
    ) -> EmbeddingResult<(String, Usage, Vec<RequestTrace>)> {
        if request.inputs.is_empty() {
            return Err(EmbeddingError::InvalidInput(EMPTY_BATCH_MESSAGE.into()));
        }
        let plan = self.plan(&request.model, options)?;
        plan.check_text_sizes(&request.inputs)?;
        let BatchEmbeddingRequest { model: request_model, inputs, normalize } = request;
        let (order, texts) = shortest_first(inputs);
        let model = wire_model(&request_model);

        // Every chunk is written before any reply is awaited, so the worker batches them
        // together; the in-flight permits make a huge batch wait here rather than grow memory.
        let mut replies = Vec::new();
        for range in plan.split(&texts) {
            let inputs = &texts[range.clone()];
            let tokens = inputs.iter().map(|text| plan.estimated_tokens(text)).sum();
            let pending = self
                .service
                .submit(inputs.len(), tokens, (true, traced), |id| {
                    wire::encode_frame(&EmbedRequest {
                        id,
                        op: EmbedRequest::OP,
                        model,
                        inputs,
                        normalize,
                        truncate: options.truncate,
                        prompt_name: options.prompt_name.as_deref(),
                        trace: traced,
                        truncation_side: options.truncation_side.map(TruncationSide::as_str),
                        dimensions: options.dimensions,
                        encoding: encoding.map(Encoding::as_str),
                    })
                })
                .await?;
            replies.push((range, pending));
        }
        // The frames hold the texts now (and are what a new worker would be sent).
        drop(texts);

        let mut usage = Usage::default();
        let mut reply_model = None;
        let mut traces = Vec::new();
        for (range, pending) in replies {
            let sent_order = &order[range];
            let (payload, times) = pending.wait_timed().await?;
            wire::decode_payload::<ReplyEnvelope>(&payload)?
                .into_embed_result(sent_order.len(), |index| sent_order[index])?;
            let reply: EmbedReply<'_> = wire::decode_payload(&payload)?;
            let (count, dimension) = reply.shape;
            if count != sent_order.len() {
                return Err(wire::protocol_violation(&format!(
                    "{count} vectors for {} inputs",
                    sent_order.len()
                )));
            }
            let wanted = encoding.unwrap_or_default();
            if reply.dtype.as_deref().unwrap_or("float32") != wanted.as_str() {
                return Err(wire::protocol_violation(&format!(
                    "a reply of dtype {:?} to a request for {}",
                    reply.dtype,
                    wanted.as_str()
                )));
            }
            let rows =
                wire::value_rows(reply.embeddings, count, dimension, wanted.bytes_per_value())?;
            for (row, &caller_index) in rows.zip(sent_order) {
                place(caller_index, row, dimension)?;
            }
            if let Some(times) = times {
                let decoded = Instant::now();
                traces.push(RequestTrace {
                    worker: reply.trace,
                    client_encode: times.encoded - times.encode_started,
                    client_write: times.written.saturating_duration_since(times.encoded),
                    reader_read: times.delivered.saturating_duration_since(times.reply_read),
                    caller_wakeup: times.woke.saturating_duration_since(times.delivered),
                    client_decode: decoded - times.woke,
                    total: decoded - times.encode_started,
                });
            }
            let reply_usage = Usage::from(reply.usage);
            usage.total_tokens += reply_usage.total_tokens;
            usage.duration_ms = usage.duration_ms.max(reply_usage.duration_ms);
            reply_model.get_or_insert(reply.model);
        }
        Ok((reply_model.unwrap_or(request_model), usage, traces))
    }

    /// The default model's id, dimension and token limit, from the worker's hello (no round
    /// trip). Fails when the client has given up, is closed, or its supervisor is gone.
    pub async fn model_info(&self) -> EmbeddingResult<ModelInfo> {
        Ok(self.service.hello()?.model)
    }

    /// [`model_info`](Self::model_info) of the loaded model `model` (the empty id: the
    /// default); `ModelNotFound` listing the loaded ids when there is none of that id.
    pub fn model_info_for(&self, model: &str) -> EmbeddingResult<ModelInfo> {
        let hello = self.service.hello()?;
        match hello.find_model(model) {
            Some(found) => Ok(found.info()),
            None => Err(EmbeddingError::ModelNotFound(format!(
                "{model:?} is not loaded; loaded: {}",
                hello.model_ids()
            ))),
        }
    }

    /// Every loaded model with all the worker announced of it (pooling, prompt names, ...),
    /// the default first.
    pub fn models(&self) -> EmbeddingResult<Vec<ModelDescription>> {
        Ok(self.service.hello()?.models)
    }

    /// Asks the worker to embed its fixed sentence and check the vector (the `health` op).
    pub async fn health_check(&self) -> EmbeddingResult<()> {
        let payload = self.call_op("health").await?;
        let health: HealthReply = wire::decode_payload(&payload)?;
        if health.status == "ok" {
            Ok(())
        } else {
            Err(EmbeddingError::Internal(format!("worker health status {:?}", health.status)))
        }
    }

    /// One `ping` round trip: the cost of the bridge alone, without the model.
    pub async fn ping(&self) -> EmbeddingResult<()> {
        self.call_op("ping").await.map(drop)
    }

    /// What the latest ready worker announced in its hello (pid, providers, limits, models,
    /// ...; the same for every worker of the pool but the pid), kept while a replacement
    /// starts; the reason there is none once the client stopped serving.
    pub fn hello(&self) -> EmbeddingResult<ReadyHello> {
        self.service.hello()
    }

    /// The pid of the (first) worker serving now; `None` while it is being replaced, after the
    /// client gave up, or after `close`. Every worker's is in [`stats`](Self::stats).
    pub fn worker_pid(&self) -> Option<u32> {
        self.service.worker_pid()
    }

    /// The pool now: each worker's pid, restarts and requests in flight, and the totals.
    pub fn stats(&self) -> ClientStats {
        self.service.stats()
    }

    /// Stops the workers gracefully, all at once: no new calls are taken, each worker finishes
    /// and answers every request already written to it (within `close_timeout`, then it is
    /// killed), and is reaped. Calls still waiting afterwards fail with `ServiceUnavailable`.
    /// Idempotent.
    pub async fn close(&self) {
        self.service.close().await;
    }

    async fn call_op(&self, op: &str) -> EmbeddingResult<Vec<u8>> {
        let pending = self.submit_without_texts(op != "ping", |id| OpRequest { id, op }).await?;
        let payload = pending.wait().await?;
        wire::decode_payload::<ReplyEnvelope>(&payload)?.into_result()?;
        Ok(payload)
    }

    /// Submits `request(id)`, a request that holds none of the caller's texts to embed (an op,
    /// `tokenize`, `quantization_ranges`): it takes no in-flight text permits and weighs
    /// nothing in routing. `shows_progress`: whether its reply shows the worker's model path
    /// alive (a `ping`'s does not: the worker's reader answers it alone).
    async fn submit_without_texts<R: Serialize>(
        &self,
        shows_progress: bool,
        request: impl FnOnce(u64) -> R,
    ) -> EmbeddingResult<PendingReply> {
        let encode = |id| wire::encode_frame(&request(id));
        self.service.submit(0, 0, (shows_progress, false), encode).await
    }
}

impl EmbeddingProvider for WorkerClient {
    async fn embed_batch(
        &self,
        request: BatchEmbeddingRequest,
    ) -> EmbeddingResult<BatchEmbeddingResponse> {
        WorkerClient::embed_batch(self, request).await
    }

    async fn model_info(&self) -> EmbeddingResult<ModelInfo> {
        WorkerClient::model_info(self).await
    }

    async fn health_check(&self) -> EmbeddingResult<()> {
        WorkerClient::health_check(self).await
    }
}

/// The `model` field of a request naming `model`: nil for the empty id, the default model.
fn wire_model(model: &str) -> Option<&str> {
    Some(model).filter(|model| !model.is_empty())
}
