//! The statistics behind the reports: the normal distribution, the chi-squared survival
//! function, the comparison of two conversion rates, Pearson's goodness of fit and the
//! distribution of a set of durations. Pure functions of their arguments; no value they
//! return is NaN for counts and shares a report can hold.

use waymark_proto::analytics::v1::{Distribution, HistogramBucket};

/// The histogram's upper bounds in seconds (1m, 5m, 15m, 1h, 6h, 1d, 3d, 7d, 14d, 30d);
/// an unbounded bucket follows the last.
pub const HISTOGRAM_BOUNDS_SECONDS: [f64; 10] = [
    60.0,
    300.0,
    900.0,
    3_600.0,
    21_600.0,
    86_400.0,
    259_200.0,
    604_800.0,
    1_209_600.0,
    2_592_000.0,
];

/// Relative precision the series and continued fraction stop at.
const EPSILON: f64 = 1e-16;
/// Guards the continued fraction's denominators against zero.
const TINY: f64 = 1e-300;
/// Far beyond the few hundred terms any argument a report meets needs.
const MAX_TERMS: usize = 100_000;

/// ln Γ(x) for x > 0: the Lanczos approximation (g = 7, nine terms), accurate to about
/// 1e-15, with the reflection formula below 1/2 where the approximation is not valid.
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let sum = C[1..]
        .iter()
        .enumerate()
        .fold(C[0], |acc, (i, c)| acc + c / (x + i as f64 + 1.0));
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The regularized upper incomplete gamma function Q(a, x) = Γ(a, x) / Γ(a), for a > 0
/// and x ≥ 0: by its power series below x = a + 1 (as 1 − P) and by its continued
/// fraction (modified Lentz) above, where each converges fast. Q(a, 0) = 1; a
/// non-positive `a` or a negative or NaN `x` gives NaN.
pub fn gamma_q(a: f64, x: f64) -> f64 {
    if a.is_nan() || x.is_nan() || a <= 0.0 || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return 1.0;
    }
    if x == f64::INFINITY {
        return 0.0;
    }
    // x^a e^-x / Γ(a), the factor both expansions share.
    let front = (a * x.ln() - x - ln_gamma(a)).exp();
    if x < a + 1.0 {
        let mut term = 1.0 / a;
        let mut sum = term;
        let mut n = a;
        for _ in 0..MAX_TERMS {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * EPSILON {
                break;
            }
        }
        (1.0 - sum * front).clamp(0.0, 1.0)
    } else {
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..MAX_TERMS {
            let i = i as f64;
            let an = -i * (i - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < EPSILON {
                break;
            }
        }
        (front * h).clamp(0.0, 1.0)
    }
}

/// The complementary error function, erfc(x) = Q(1/2, x²) for x ≥ 0 and 2 − erfc(−x)
/// below: accurate relative to its value far into the tail, where p-values live.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    let q = gamma_q(0.5, x * x);
    if x >= 0.0 { q } else { 2.0 - q }
}

/// The standard normal distribution function Φ(x).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// The standard normal quantile Φ⁻¹(p): Acklam's rational approximation (relative error
/// below 1.2e-9) refined by one Halley step on `normal_cdf`, which brings it to about
/// 1e-15. The lower half is computed and the upper mirrored, since 1 − p is exact for
/// p ≥ 1/2 and the tail keeps its precision. −∞ at 0, +∞ at 1, NaN outside [0, 1].
pub fn normal_quantile(p: f64) -> f64 {
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p > 0.5 {
        return -normal_quantile(1.0 - p);
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let horner = |coefficients: &[f64], x: f64| coefficients.iter().fold(0.0, |acc, c| acc * x + c);
    let x = if p < 0.02425 {
        let q = (-2.0 * p.ln()).sqrt();
        horner(&C, q) / (horner(&D, q) * q + 1.0)
    } else {
        let q = p - 0.5;
        let r = q * q;
        horner(&A, r) * q / (horner(&B, r) * r + 1.0)
    };
    let e = normal_cdf(x) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    // Near the smallest doubles exp(x²/2) overflows and the step would be ∞ or NaN;
    // there the approximation stands alone.
    if u.is_finite() {
        x - u / (1.0 + x * u / 2.0)
    } else {
        x
    }
}

/// The chi-squared survival function P(X ≥ x) with `df` degrees of freedom, Q(df/2, x/2).
/// With no degrees of freedom nothing could vary, and the answer is 1.
pub fn chi_squared_sf(x: f64, df: u32) -> f64 {
    if df == 0 {
        return 1.0;
    }
    gamma_q(f64::from(df) / 2.0, x.max(0.0) / 2.0)
}

/// A variant's conversion rate against control's.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Comparison {
    /// The variant's rate minus control's.
    pub uplift: f64,
    /// `uplift` over control's rate; 0 when control's rate is 0.
    pub relative_uplift: f64,
    /// The pooled two-proportion z statistic; 0 when the test has nothing to go on.
    pub z: f64,
    /// Lower bound of the confidence interval of `uplift`.
    pub ci_low: f64,
    /// Upper bound of that interval.
    pub ci_high: f64,
    /// The two-sided p-value of the difference.
    pub p_value: f64,
}

/// Compares the conversion of `variant` with `control`, each `(enrollments,
/// conversions)`, at `confidence` (e.g. 0.95; clamped to [0, 1]).
///
/// The interval is the normal approximation of the difference of two proportions with
/// unpooled variances, `uplift ± z(1 − (1 − confidence)/2) · √(p_v(1−p_v)/n_v +
/// p_c(1−p_c)/n_c)`; the p-value is the two-sided pooled z-test, `z = uplift /
/// √(p(1−p)(1/n_v + 1/n_c))` with `p` the pooled rate.
///
/// Edge cases, none NaN: when either arm has no enrollments there is nothing to compare
/// and everything is 0 with p-value 1. When the pooled rate is 0 or 1 (both arms at 0%,
/// or both at 100%) the rates are equal: p-value 1. When the unpooled variance is 0 (each
/// rate 0 or 1) the interval is the single point `uplift`. Conversions above the
/// enrollments count as all enrollments.
pub fn compare(control: (u64, u64), variant: (u64, u64), confidence: f64) -> Comparison {
    let (n_c, n_v) = (control.0, variant.0);
    if n_c == 0 || n_v == 0 {
        return Comparison {
            p_value: 1.0,
            ..Comparison::default()
        };
    }
    let (x_c, x_v) = (control.1.min(n_c), variant.1.min(n_v));
    let (n_c, n_v, x_c, x_v) = (n_c as f64, n_v as f64, x_c as f64, x_v as f64);
    let (p_c, p_v) = (x_c / n_c, x_v / n_v);
    let uplift = p_v - p_c;
    let relative_uplift = if p_c > 0.0 { uplift / p_c } else { 0.0 };

    let pooled = (x_c + x_v) / (n_c + n_v);
    let se_pooled = (pooled * (1.0 - pooled) * (1.0 / n_c + 1.0 / n_v)).sqrt();
    let (z, p_value) = if se_pooled > 0.0 {
        let z = uplift / se_pooled;
        (z, erfc(z.abs() / std::f64::consts::SQRT_2))
    } else {
        (0.0, 1.0)
    };

    let se = (p_c * (1.0 - p_c) / n_c + p_v * (1.0 - p_v) / n_v).sqrt();
    let (ci_low, ci_high) = if se > 0.0 {
        let confidence = if confidence.is_nan() {
            0.0
        } else {
            confidence.clamp(0.0, 1.0)
        };
        let margin = normal_quantile(1.0 - (1.0 - confidence) / 2.0) * se;
        (uplift - margin, uplift + margin)
    } else {
        (uplift, uplift)
    };
    Comparison {
        uplift,
        relative_uplift,
        z,
        ci_low,
        ci_high,
        p_value,
    }
}

/// Pearson's chi-squared test of `observed` counts against `expected_shares` (one per
/// count; a missing, negative or NaN share counts as 0). The shares are normalised to
/// sum to 1; the degrees of freedom are the categories with a positive share, less one.
/// A category with share 0 and no observations takes no part; one with share 0 and
/// observations cannot happen under the expectation, so the statistic is +∞ and the
/// p-value 0. With nothing observed, no positive share, or one category, there is
/// nothing to test: `(0, 1)`. Returns `(chi_squared, p_value)`.
pub fn goodness_of_fit(observed: &[u64], expected_shares: &[f64]) -> (f64, f64) {
    let share = |i: usize| expected_shares.get(i).map_or(0.0, |s| s.max(0.0));
    let total: u64 = observed.iter().sum();
    let share_sum: f64 = (0..observed.len()).map(share).sum();
    if total == 0 || share_sum <= 0.0 {
        return (0.0, 1.0);
    }
    let mut chi_squared = 0.0;
    let mut categories = 0u32;
    for (i, &o) in observed.iter().enumerate() {
        let expected = total as f64 * share(i) / share_sum;
        if expected > 0.0 {
            chi_squared += (o as f64 - expected).powi(2) / expected;
            categories += 1;
        } else if o > 0 {
            return (f64::INFINITY, 0.0);
        }
    }
    if categories < 2 {
        return (0.0, 1.0);
    }
    (chi_squared, chi_squared_sf(chi_squared, categories - 1))
}

/// The value at quantile `q` of sorted, non-empty `sorted`, interpolated linearly between
/// the two nearest ranks: position `(n − 1)·q` counted from 0 (the "inclusive" method of
/// Python's `statistics.quantiles`, R's type 7, NumPy's default).
fn quantile(values: &mut [f64], q: f64) -> f64 {
    let position = (values.len() - 1) as f64 * q;
    let below = position.floor() as usize;
    // Selection instead of a sort: a funnel over millions of customers has millions of
    // durations per step, and only two ranks are read.
    let (_, &mut at_below, rest) = values.select_nth_unstable_by(below, f64::total_cmp);
    let at_above = rest
        .iter()
        .copied()
        .min_by(f64::total_cmp)
        .unwrap_or(at_below);
    at_below + (position - below as f64) * (at_above - at_below)
}

/// The distribution of `seconds` (reordered in place; values that are not finite are left
/// out): the count, the median and 90th percentile by linear interpolation between the
/// nearest ranks (see `quantile`), the mean, and the histogram over
/// `HISTOGRAM_BOUNDS_SECONDS`, where a value lands in the first bucket whose bound it
/// does not exceed (so a bound is inclusive, as is anything at or below 0 in the first
/// bucket) and in the unbounded last bucket (bound 0) past the last. Every bucket is
/// present, empty ones too. With no values every figure is 0.
pub fn distribution(seconds: &mut Vec<f64>) -> Distribution {
    seconds.retain(|s| s.is_finite());
    let mut histogram: Vec<HistogramBucket> = HISTOGRAM_BOUNDS_SECONDS
        .iter()
        .chain(&[0.0])
        .map(|&upper_bound_seconds| HistogramBucket {
            upper_bound_seconds,
            count: 0,
        })
        .collect();
    for &s in seconds.iter() {
        let bucket = HISTOGRAM_BOUNDS_SECONDS.partition_point(|&bound| s > bound);
        histogram[bucket].count += 1;
    }
    if seconds.is_empty() {
        return Distribution {
            histogram,
            ..Distribution::default()
        };
    }
    Distribution {
        count: seconds.len() as u64,
        median_seconds: quantile(seconds, 0.5),
        p90_seconds: quantile(seconds, 0.9),
        mean_seconds: seconds.iter().sum::<f64>() / seconds.len() as f64,
        histogram,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `got` is within `relative` of `want` (absolutely, when `want` is 0).
    fn close(got: f64, want: f64, relative: f64) -> bool {
        (got - want).abs() <= relative * want.abs().max(f64::MIN_POSITIVE)
    }

    #[track_caller]
    fn assert_close(got: f64, want: f64, relative: f64) {
        assert!(
            close(got, want, relative),
            "{got} is not {want} (within {relative})"
        );
    }

    #[test]
    fn the_normal_distribution_matches_the_reference() {
        // python3: NormalDist().cdf(x), and 0.5 * erfc(8 / sqrt(2)) for the far tail.
        assert_close(normal_cdf(1.96), 0.9750021048517796, 1e-14);
        assert_close(normal_cdf(0.5), 0.6914624612740131, 1e-14);
        assert_close(normal_cdf(-3.0), 0.0013498980316301035, 1e-13);
        assert_close(normal_cdf(-8.0), 6.220960574271819e-16, 1e-12);
        assert_close(normal_cdf(0.0), 0.5, 1e-15);
        // python3: math.erfc(x).
        assert_close(erfc(0.1), 0.8875370839817152, 1e-14);
        assert_close(erfc(2.0), 0.004677734981047265, 1e-13);
        assert_close(erfc(-1.0), 1.842700792949715, 1e-14);
        assert_close(erfc(10.0), 2.088487583762545e-45, 1e-12);
    }

    #[test]
    fn the_normal_quantile_matches_the_reference_in_every_region() {
        // python3: NormalDist().inv_cdf(p).
        for (p, want) in [
            (0.975, 1.9599639845400536),
            (0.95, 1.6448536269514715),
            (0.995, 2.5758293035489),
            (0.3, -0.5244005127080407),
            (0.02, -2.0537489106318225),
            (1e-10, -6.361340902404056),
            (1e-300, -37.0470962993612),
        ] {
            assert_close(normal_quantile(p), want, 1e-12);
        }
        assert_eq!(normal_quantile(0.5), 0.0);
        assert_eq!(normal_quantile(0.0), f64::NEG_INFINITY);
        assert_eq!(normal_quantile(1.0), f64::INFINITY);
        assert!(normal_quantile(1.5).is_nan());
        for p in [1e-6, 0.01, 0.2, 0.5, 0.7, 0.99] {
            assert_close(normal_cdf(normal_quantile(p)), p, 1e-13);
        }
    }

    #[test]
    fn the_chi_squared_survival_function_matches_the_reference() {
        // df = 1: python3 erfc(sqrt(x / 2)).
        assert_close(
            chi_squared_sf(3.841458820694124, 1),
            0.05000000000000008,
            1e-12,
        );
        assert_close(chi_squared_sf(0.5, 1), 0.4795001221869535, 1e-13);
        assert_close(chi_squared_sf(20.0, 1), 7.744216431044074e-06, 1e-12);
        assert_close(chi_squared_sf(100.0, 1), 1.5239706048320995e-23, 1e-12);
        // df = 2: python3 exp(-x / 2).
        assert_close(
            chi_squared_sf(5.991464547107979, 2),
            0.05000000000000007,
            1e-12,
        );
        assert_close(chi_squared_sf(0.1, 2), 0.951229424500714, 1e-13);
        assert_close(chi_squared_sf(30.0, 2), 3.059023205018258e-07, 1e-12);
        // df = 3: python3 erfc(sqrt(x / 2)) + sqrt(2 * x / pi) * exp(-x / 2).
        assert_close(
            chi_squared_sf(7.814727903251178, 3),
            0.050000000000000044,
            1e-12,
        );
        assert_close(chi_squared_sf(1.0, 3), 0.8012519569012008, 1e-13);
        assert_close(chi_squared_sf(25.0, 3), 1.5440498291101365e-05, 1e-12);
        assert_eq!(chi_squared_sf(0.0, 4), 1.0);
        assert_eq!(chi_squared_sf(5.0, 0), 1.0);
    }

    #[test]
    fn an_ab_test_reads_as_in_the_textbook() {
        // Control 100 of 1000 converted, the variant 130 of 1000. python3:
        // pc, pv = 0.1, 0.13; p = 230 / 2000; z = (pv - pc) / sqrt(p * (1 - p) * (2 / 1000));
        // erfc(abs(z) / sqrt(2)); se = sqrt(pc * (1 - pc) / 1000 + pv * (1 - pv) / 1000);
        // (pv - pc) -/+ NormalDist().inv_cdf(0.975) * se.
        let c = compare((1000, 100), (1000, 130), 0.95);
        assert_close(c.uplift, 0.03, 1e-12);
        assert_close(c.relative_uplift, 0.3, 1e-12);
        assert_close(c.z, 2.102740605622114, 1e-12);
        assert_close(c.p_value, 0.03548845046647473, 1e-12);
        assert_close(c.ci_low, 0.0020679344393763725, 1e-9);
        assert_close(c.ci_high, 0.05793206556062362, 1e-12);
        // The same at 99%: the interval (from inv_cdf(0.995)) now spans 0.
        let c = compare((1000, 100), (1000, 130), 0.99);
        assert_close(c.ci_low, -0.006708956668194863, 1e-9);
        assert_close(c.ci_high, 0.06670895666819486, 1e-12);
        assert_close(c.p_value, 0.03548845046647473, 1e-12);
    }

    #[test]
    fn a_worse_smaller_arm_compares_negatively() {
        // Control 100 of 1000, a holdout 0 of 200; python3 as above with n_v = 200.
        let c = compare((1000, 100), (200, 0), 0.95);
        assert_close(c.uplift, -0.1, 1e-12);
        assert_close(c.relative_uplift, -1.0, 1e-12);
        assert_close(c.z, -4.670993664969139, 1e-12);
        assert_close(c.p_value, 2.9974618462528634e-06, 1e-11);
        assert_close(c.ci_low, -0.11859385096913685, 1e-12);
        assert_close(c.ci_high, -0.08140614903086316, 1e-12);
    }

    #[test]
    fn comparisons_at_the_edges_are_defined() {
        let nothing = Comparison {
            p_value: 1.0,
            ..Comparison::default()
        };
        assert_eq!(compare((0, 0), (1000, 130), 0.95), nothing, "empty control");
        assert_eq!(compare((1000, 100), (0, 0), 0.95), nothing, "empty variant");
        let zero = compare((500, 0), (700, 0), 0.95);
        assert_eq!(zero, nothing, "both at 0%: equal, a point interval at 0");
        let all = compare((500, 500), (700, 700), 0.95);
        assert_eq!(all, nothing, "both at 100%: equal, a point interval at 0");
        // 0 of 10 against 10 of 10: the pooled test still decides (python3 as above:
        // erfc(sqrt(20) / sqrt(2))), while the unpooled interval has no width.
        let apart = compare((10, 0), (10, 10), 0.95);
        assert_eq!((apart.uplift, apart.ci_low, apart.ci_high), (1.0, 1.0, 1.0));
        assert_eq!(apart.relative_uplift, 0.0, "control at 0%");
        assert_close(apart.p_value, 7.744216431044096e-06, 1e-11);
        let same = compare((1000, 100), (1000, 100), 0.95);
        assert_eq!((same.uplift, same.z, same.p_value), (0.0, 0.0, 1.0));
        // python3: NormalDist().inv_cdf(0.975) * sqrt(2 * 0.1 * 0.9 / 1000).
        assert_close(same.ci_high, 0.02629567621729744, 1e-12);
        assert_close(same.ci_low, -0.02629567621729744, 1e-12);
        let overcounted = compare((10, 20), (10, 5), 0.95);
        assert_eq!(
            overcounted.uplift, -0.5,
            "conversions capped at enrollments"
        );
        for c in [
            zero,
            all,
            apart,
            same,
            overcounted,
            compare((3, 1), (4, 2), 2.0),
        ] {
            for v in [
                c.uplift,
                c.relative_uplift,
                c.z,
                c.ci_low,
                c.ci_high,
                c.p_value,
            ] {
                assert!(!v.is_nan(), "{c:?}");
            }
        }
    }

    #[test]
    fn a_sample_ratio_mismatch_shows_in_the_goodness_of_fit() {
        // A 50/50 split. python3: chi = 2 * (o1 - t / 2) ** 2 / (t / 2); erfc(sqrt(chi / 2)).
        let (chi, p) = goodness_of_fit(&[5000, 5400], &[0.5, 0.5]);
        assert_close(chi, 15.384615384615385, 1e-12);
        assert_close(p, 8.769942375590239e-05, 1e-11);
        assert!(p < 0.001, "5000 against 5400 is a mismatch");
        let (chi, p) = goodness_of_fit(&[5000, 5300], &[1.0, 1.0]);
        assert_close(chi, 8.737864077669903, 1e-12);
        assert_close(p, 0.0031166938398668655, 1e-11);
        assert!(
            p > 0.001,
            "5000 against 5300 is unlikely, but not past the threshold"
        );
        let (chi, p) = goodness_of_fit(&[5000, 5100], &[50.0, 50.0]);
        assert_close(chi, 0.9900990099009901, 1e-12);
        assert_close(p, 0.3197181768128704, 1e-12);
    }

    #[test]
    fn goodness_of_fit_takes_any_number_of_arms() {
        // Two arms and a 10% holdout. python3: chi as Pearson's sum; exp(-chi / 2).
        let (chi, p) = goodness_of_fit(&[1000, 1000, 200], &[0.45, 0.45, 0.1]);
        assert_close(chi, 2.0202020202020203, 1e-12);
        assert_close(p, 0.3641821916336149, 1e-12);
        // Four equal arms, one never assigned. python3: the df = 3 expression.
        let (chi, p) = goodness_of_fit(&[450, 300, 250, 0], &[1.0, 1.0, 1.0, 1.0]);
        assert_close(chi, 420.0, 1e-12);
        assert_close(p, 1.0298023383403668e-90, 1e-10);
    }

    #[test]
    fn goodness_of_fit_handles_arms_expected_to_get_nothing() {
        // An arm at weight 0 that got nothing takes no part: this is a 50/50 test.
        assert_eq!(
            goodness_of_fit(&[5000, 5400, 0], &[0.5, 0.5, 0.0]),
            goodness_of_fit(&[5000, 5400], &[0.5, 0.5])
        );
        // One that got something cannot be explained by the weights.
        assert_eq!(
            goodness_of_fit(&[5000, 5000, 1], &[0.5, 0.5, 0.0]),
            (f64::INFINITY, 0.0)
        );
        assert_eq!(
            goodness_of_fit(&[0, 0], &[0.5, 0.5]),
            (0.0, 1.0),
            "nothing observed"
        );
        assert_eq!(
            goodness_of_fit(&[7, 3], &[0.0, 0.0]),
            (0.0, 1.0),
            "nothing expected"
        );
        assert_eq!(goodness_of_fit(&[10], &[1.0]), (0.0, 1.0), "one arm");
        assert_eq!(
            goodness_of_fit(&[10, 0], &[1.0]),
            (0.0, 1.0),
            "a share missing is 0"
        );
        assert_eq!(
            goodness_of_fit(&[10, 10], &[f64::NAN, 1.0]),
            (f64::INFINITY, 0.0),
            "a NaN share is 0"
        );
    }

    #[test]
    fn a_distribution_interpolates_its_quantiles_and_fills_every_bucket() {
        let mut seconds = vec![
            400.0,
            30.0,
            3_000_000.0,
            60.0,
            45.0,
            4_000.0,
            300.0,
            90_000.0,
            0.0,
            120.0,
            61.0,
            700_000.0,
        ];
        let d = distribution(&mut seconds);
        assert_eq!(d.count, 12);
        // python3: statistics.median(d), statistics.quantiles(d, n=10,
        // method="inclusive")[8], statistics.fmean(d).
        assert_close(d.median_seconds, 210.0, 1e-15);
        assert_close(d.p90_seconds, 639_000.0, 1e-15);
        assert_close(d.mean_seconds, 316_251.3333333333, 1e-15);
        let buckets: Vec<(f64, u64)> = d
            .histogram
            .iter()
            .map(|b| (b.upper_bound_seconds, b.count))
            .collect();
        assert_eq!(
            buckets,
            [
                (60.0, 4),
                (300.0, 3),
                (900.0, 1),
                (3_600.0, 0),
                (21_600.0, 1),
                (86_400.0, 0),
                (259_200.0, 1),
                (604_800.0, 0),
                (1_209_600.0, 1),
                (2_592_000.0, 0),
                (0.0, 1),
            ]
        );
    }

    #[test]
    fn small_and_empty_distributions_are_defined() {
        // python3: statistics.median([10, 20]), quantiles(.., method="inclusive")[8].
        let d = distribution(&mut vec![20.0, 10.0]);
        assert_eq!(
            (d.count, d.median_seconds, d.p90_seconds, d.mean_seconds),
            (2, 15.0, 19.0, 15.0)
        );
        let d = distribution(&mut vec![7.5, f64::NAN]);
        assert_eq!(
            (d.count, d.median_seconds, d.p90_seconds, d.mean_seconds),
            (1, 7.5, 7.5, 7.5)
        );
        let d = distribution(&mut Vec::new());
        assert_eq!(
            (d.count, d.median_seconds, d.p90_seconds, d.mean_seconds),
            (0, 0.0, 0.0, 0.0)
        );
        assert_eq!(d.histogram.len(), 11);
        assert!(d.histogram.iter().all(|b| b.count == 0));
    }
}
