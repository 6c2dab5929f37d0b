{{/*
The effective values: chart defaults < profile < compatibilityVersion < user values
(Istio's layering: a compatibilityVersion profile brings back an earlier release's defaults).
Use as: {{- $v := include "istio-cni.values" . | fromYaml }}
*/}}
{{- define "istio-cni.values" -}}
{{- $defaults := deepCopy (index .Values "_internal_defaults_do_not_set") -}}
{{- $profile := dict -}}
{{- if .Values.profile -}}
{{- $file := printf "files/profile-%s.yaml" .Values.profile -}}
{{- $raw := .Files.Get $file -}}
{{- if not $raw -}}
{{- fail (printf "unknown profile %q: no %s in the chart" .Values.profile $file) -}}
{{- end -}}
{{- $profile = fromYaml $raw -}}
{{- end -}}
{{- with .Values.compatibilityVersion -}}
{{- $ver := toString . -}}
{{- /* --set compatibilityVersion=1.30 arrives as the number 1.3 */ -}}
{{- if eq $ver "1.3" }}{{ $ver = "1.30" }}{{ end -}}
{{- $file := printf "files/profile-compatibility-version-%s.yaml" $ver -}}
{{- $raw := $.Files.Get $file -}}
{{- if not $raw -}}
{{- fail (printf "unknown compatibility version %s: no %s in the chart (1.24 to 1.30)" $ver $file) -}}
{{- end -}}
{{- $_ := mustMergeOverwrite $profile (fromYaml $raw) -}}
{{- end -}}
{{- $user := omit .Values "_internal_defaults_do_not_set" "profile" "compatibilityVersion" -}}
{{- mustMergeOverwrite $defaults $profile (deepCopy $user) | toYaml -}}
{{- end -}}

{{- define "istio-cni.labels" -}}
app: istio-cni
app.kubernetes.io/name: istio-cni
app.kubernetes.io/part-of: istio
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
