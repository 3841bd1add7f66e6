//! One Deployment's simulated autoscaler: KEDA's activation and cooldown around the HorizontalPodAutoscaler that
//! KEDA creates, evaluated every `pollingInterval`.
//!
//! Policy, following the Kubernetes HPA controller (`pkg/controller/podautoscaler`) and KEDA's scale loop:
//! - per trigger: AverageValue gives `ceil(metric / target)`, Value gives `ceil(current × metric / target)`; within
//!   the HPA's 10 % tolerance (`|ratio - 1| <= 0.1`) the trigger asks for the current count; the HPA takes the
//!   largest of the triggers' counts, clamped to `[max(min, 1), max]`;
//! - stabilisation: the recommendation is held between the smallest recommendation of the scale-up window and the
//!   largest of the scale-down window (both windows include the current one);
//! - rate: within each policy's `periodSeconds`, scale-up is bounded by the replicas at the period's start plus the
//!   pods / percent the policy allows (`selectPolicy` Max: the most permissive policy, Min: the least); scale-down
//!   likewise;
//! - KEDA (only when `minReplicaCount` is 0): at zero replicas, any trigger above its `activationThreshold` wakes the
//!   Deployment to one replica; at one or more, it goes to zero once no trigger has been active for
//!   `cooldownPeriod`. Otherwise the HPA never goes below one replica.
//!
//! Simplifications (stated, not hidden): the HPA's sync period is taken equal to `pollingInterval` (both are 15 s
//! in `k8s/components/keda`); the metric is read at the evaluation instant (Prometheus scrapes every 15 s in
//! `k8s/components/servicemonitors`, in step with the polls); no `fallback` (Prometheus is always reachable).

use std::collections::VecDeque;

use crate::keda::{MetricType, PolicyKind, Rules, ScalerSpec, SelectPolicy};

/// The HPA controller's default tolerance (`--horizontal-pod-autoscaler-tolerance`).
pub const TOLERANCE: f64 = 0.1;

/// The replica count one trigger asks for, before min / max and behaviour.
pub fn desired_for_metric(metric_type: MetricType, metric: f64, target: f64, current: u32) -> u32 {
    let current_f = f64::from(current);
    let (ratio, desired) = match metric_type {
        MetricType::AverageValue => {
            let desired = (metric / target).ceil();
            if current == 0 {
                return clamp_count(desired);
            }
            (metric / (target * current_f), desired)
        }
        MetricType::Value => {
            let ratio = metric / target;
            (ratio, (current_f * ratio).ceil())
        }
    };
    if (ratio - 1.0).abs() <= TOLERANCE {
        current
    } else {
        clamp_count(desired)
    }
}

fn clamp_count(value: f64) -> u32 {
    if value.is_nan() || value <= 0.0 {
        0
    } else if value >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        value as u32
    }
}

/// The state the HPA and KEDA keep between evaluations for one Deployment.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    spec: ScalerSpec,
    /// (time, unstabilised recommendation), newest last, pruned to the longest window.
    recommendations: VecDeque<(f64, u32)>,
    /// (time, replicas added), pruned to the longest scale-up period.
    scale_up_events: VecDeque<(f64, u32)>,
    /// (time, replicas removed), pruned to the longest scale-down period.
    scale_down_events: VecDeque<(f64, u32)>,
    /// The last evaluation at which a trigger was above its activation threshold.
    last_active: Option<f64>,
}

impl Autoscaler {
    /// An autoscaler for `spec` with no history.
    pub fn new(spec: ScalerSpec) -> Self {
        Self {
            spec,
            recommendations: VecDeque::new(),
            scale_up_events: VecDeque::new(),
            scale_down_events: VecDeque::new(),
            last_active: None,
        }
    }

    /// The spec it runs.
    pub fn spec(&self) -> &ScalerSpec {
        &self.spec
    }

    /// The replica count to set at `now`, given the current (desired, not necessarily ready) count and each
    /// trigger's metric value in the spec's trigger order.
    pub fn evaluate(&mut self, now: f64, current: u32, metrics: &[f64]) -> u32 {
        let active = self
            .spec
            .triggers
            .iter()
            .zip(metrics)
            .any(|(trigger, value)| *value > trigger.activation_threshold);
        if active {
            self.last_active = Some(now);
        }
        if self.spec.min_replicas == 0 {
            if current == 0 {
                return u32::from(active);
            }
            let cooled_down = self
                .last_active
                .is_none_or(|last| now - last >= self.spec.cooldown_seconds);
            if !active && cooled_down {
                self.record_change(now, current, 0);
                return 0;
            }
        }
        let hpa_min = self.spec.min_replicas.max(1);
        let raw = self
            .spec
            .triggers
            .iter()
            .zip(metrics)
            .map(|(trigger, value)| {
                desired_for_metric(trigger.metric_type, *value, trigger.threshold, current)
            })
            .max()
            .unwrap_or(current)
            .clamp(hpa_min, self.spec.max_replicas);
        let stabilised = self.stabilise(now, current, raw);
        let limited = self.limit_rate(now, current, stabilised);
        self.record_change(now, current, limited);
        limited
    }

    fn stabilise(&mut self, now: f64, current: u32, raw: u32) -> u32 {
        let up_window = self.spec.scale_up.stabilization_window_seconds;
        let down_window = self.spec.scale_down.stabilization_window_seconds;
        let longest = up_window.max(down_window);
        while self
            .recommendations
            .front()
            .is_some_and(|(time, _)| now - time > longest)
        {
            self.recommendations.pop_front();
        }
        let mut up_recommendation = raw;
        let mut down_recommendation = raw;
        for &(time, recommendation) in &self.recommendations {
            if now - time < up_window {
                up_recommendation = up_recommendation.min(recommendation);
            }
            if now - time < down_window {
                down_recommendation = down_recommendation.max(recommendation);
            }
        }
        self.recommendations.push_back((now, raw));
        current.max(up_recommendation).min(down_recommendation)
    }

    fn limit_rate(&mut self, now: f64, current: u32, desired: u32) -> u32 {
        if desired > current {
            let rules = &self.spec.scale_up;
            let added = |period: f64| -> u32 { sum_within(&self.scale_up_events, now, period) };
            let limit = direction_limit(rules, |policy_value, kind, period| {
                let start = current.saturating_sub(added(period));
                match kind {
                    PolicyKind::Pods => i64::from(start) + i64::from(policy_value),
                    PolicyKind::Percent => {
                        (f64::from(start) * (1.0 + f64::from(policy_value) / 100.0)).ceil() as i64
                    }
                }
            });
            match limit {
                None => current,
                Some(limit) => {
                    let limit = limit
                        .min(i64::from(self.spec.max_replicas))
                        .max(i64::from(current));
                    desired.min(u32::try_from(limit).unwrap_or(current))
                }
            }
        } else if desired < current {
            let rules = &self.spec.scale_down;
            let removed = |period: f64| -> u32 { sum_within(&self.scale_down_events, now, period) };
            // For scale-down the most permissive policy gives the lowest count: negate so that `direction_limit`
            // can pick with the same Max / Min meaning.
            let limit = direction_limit(rules, |policy_value, kind, period| {
                let start = current + removed(period);
                let allowed = match kind {
                    PolicyKind::Pods => i64::from(policy_value),
                    PolicyKind::Percent => {
                        (f64::from(start) * f64::from(policy_value) / 100.0).floor() as i64
                    }
                };
                -(i64::from(start) - allowed)
            });
            match limit {
                None => current,
                Some(negated) => {
                    let limit = (-negated)
                        .max(i64::from(self.spec.min_replicas.max(1)))
                        .min(i64::from(current));
                    desired.max(u32::try_from(limit).unwrap_or(current))
                }
            }
        } else {
            desired
        }
    }

    fn record_change(&mut self, now: f64, current: u32, next: u32) {
        let longest_up = longest_period(&self.spec.scale_up);
        let longest_down = longest_period(&self.spec.scale_down);
        prune(&mut self.scale_up_events, now, longest_up);
        prune(&mut self.scale_down_events, now, longest_down);
        if next > current {
            self.scale_up_events.push_back((now, next - current));
        } else if next < current {
            self.scale_down_events.push_back((now, current - next));
        }
    }
}

/// The most permissive (Max) or least permissive (Min) of the policies' limits, where a larger value is more
/// permissive; `None` when the direction is disabled or has no policy.
fn direction_limit(rules: &Rules, limit_of: impl Fn(u32, PolicyKind, f64) -> i64) -> Option<i64> {
    let limits = rules
        .policies
        .iter()
        .map(|policy| limit_of(policy.value, policy.kind, policy.period_seconds));
    match rules.select_policy {
        SelectPolicy::Max => limits.max(),
        SelectPolicy::Min => limits.min(),
        SelectPolicy::Disabled => None,
    }
}

fn sum_within(events: &VecDeque<(f64, u32)>, now: f64, period: f64) -> u32 {
    events
        .iter()
        .filter(|(time, _)| now - time < period)
        .map(|(_, change)| *change)
        .sum()
}

fn longest_period(rules: &Rules) -> f64 {
    rules
        .policies
        .iter()
        .map(|policy| policy.period_seconds)
        .fold(0.0, f64::max)
}

fn prune(events: &mut VecDeque<(f64, u32)>, now: f64, period: f64) {
    while events.front().is_some_and(|(time, _)| now - time >= period) {
        events.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keda::{Gauge, Policy, PoolKind, Signal, Trigger};

    fn spec(min: u32, max: u32) -> ScalerSpec {
        ScalerSpec {
            name: "test".to_owned(),
            polling_interval_seconds: 15.0,
            cooldown_seconds: 300.0,
            min_replicas: min,
            max_replicas: max,
            scale_up: Rules {
                stabilization_window_seconds: 0.0,
                select_policy: SelectPolicy::Max,
                policies: vec![
                    Policy {
                        kind: PolicyKind::Pods,
                        value: 2,
                        period_seconds: 60.0,
                    },
                    Policy {
                        kind: PolicyKind::Percent,
                        value: 100,
                        period_seconds: 60.0,
                    },
                ],
            },
            scale_down: Rules {
                stabilization_window_seconds: 0.0,
                select_policy: SelectPolicy::Min,
                policies: vec![Policy {
                    kind: PolicyKind::Pods,
                    value: 1,
                    period_seconds: 300.0,
                }],
            },
            triggers: vec![Trigger {
                name: "calls".to_owned(),
                metric_type: MetricType::AverageValue,
                threshold: 8.0,
                activation_threshold: 0.0,
                signal: Signal::GaugeSum(vec![(Gauge::PendingRequests, PoolKind::Encoder)]),
            }],
        }
    }

    #[test]
    fn the_hpa_formula_is_ceil_of_current_times_ratio() {
        // Value: ceil(4 × 3 / 2) = 6.
        assert_eq!(desired_for_metric(MetricType::Value, 3.0, 2.0, 4), 6);
        // AverageValue: ceil(total / target) = ceil(50 / 8) = 7, i.e. ceil(2 × (25 / 8)).
        assert_eq!(
            desired_for_metric(MetricType::AverageValue, 50.0, 8.0, 2),
            7
        );
        // Within the 10 % tolerance the count stays.
        assert_eq!(
            desired_for_metric(MetricType::AverageValue, 17.0, 8.0, 2),
            2
        );
        assert_eq!(desired_for_metric(MetricType::Value, 2.1, 2.0, 3), 3);
        // Idle: zero, which min replicas then lifts.
        assert_eq!(desired_for_metric(MetricType::Value, 0.0, 2.0, 3), 0);
    }

    #[test]
    fn the_result_stays_within_min_and_max() {
        let mut scaler = Autoscaler::new(spec(1, 8));
        // 1000 / 8 = 125 asked; the rate policy allows 2 → 4, then 4 → 8, never above max.
        assert_eq!(scaler.evaluate(0.0, 2, &[1000.0]), 4);
        assert_eq!(scaler.evaluate(60.0, 4, &[1000.0]), 8);
        assert_eq!(scaler.evaluate(120.0, 8, &[1000.0]), 8);
        // Idle: never below min 1, one pod per 300 s.
        let mut idle = Autoscaler::new(spec(1, 8));
        assert_eq!(idle.evaluate(0.0, 3, &[0.0]), 2);
        assert_eq!(idle.evaluate(15.0, 2, &[0.0]), 2);
        assert_eq!(idle.evaluate(300.0, 2, &[0.0]), 1);
        assert_eq!(idle.evaluate(900.0, 1, &[0.0]), 1);
    }

    #[test]
    fn scale_up_is_limited_by_the_pods_and_percent_policies() {
        let mut scaler = Autoscaler::new(spec(1, 8));
        // From 1: Pods allows 3, Percent allows 2; Max picks 3.
        assert_eq!(scaler.evaluate(0.0, 1, &[80.0]), 3);
        // Within the same 60 s period the start is still 1: no further growth.
        assert_eq!(scaler.evaluate(15.0, 3, &[80.0]), 3);
        // A new period starts from 3: Pods 5, Percent 6 → 6.
        assert_eq!(scaler.evaluate(60.0, 3, &[80.0]), 6);
    }

    #[test]
    fn the_scale_down_window_holds_the_highest_recent_recommendation() {
        let mut windowed = spec(1, 8);
        windowed.scale_down.stabilization_window_seconds = 600.0;
        windowed.scale_down.policies[0].value = 8;
        let mut scaler = Autoscaler::new(windowed);
        assert_eq!(scaler.evaluate(0.0, 4, &[32.0]), 4);
        // The load is gone, but 4 was recommended within the last 600 s.
        assert_eq!(scaler.evaluate(15.0, 4, &[0.0]), 4);
        assert_eq!(scaler.evaluate(599.0, 4, &[0.0]), 4);
        assert_eq!(scaler.evaluate(601.0, 4, &[0.0]), 1);
    }

    #[test]
    fn cooldown_takes_an_idle_pool_to_zero_and_activation_wakes_it() {
        let mut scaler = Autoscaler::new(spec(0, 8));
        assert_eq!(scaler.evaluate(0.0, 1, &[3.0]), 1);
        // Inactive since t = 0: stays at one replica until cooldownPeriod (300 s) has passed.
        assert_eq!(scaler.evaluate(15.0, 1, &[0.0]), 1);
        assert_eq!(scaler.evaluate(285.0, 1, &[0.0]), 1);
        assert_eq!(scaler.evaluate(300.0, 1, &[0.0]), 0);
        assert_eq!(scaler.evaluate(315.0, 0, &[0.0]), 0);
        // One pending call (above activationThreshold 0) wakes it to exactly one.
        assert_eq!(scaler.evaluate(330.0, 0, &[1.0]), 1);
    }
}
